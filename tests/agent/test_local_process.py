"""The agent end to end on the local-process runner: real registry, queue, builder and agent processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.models import GitSource
from takeoff.v1 import agent_pb2, agent_pb2_grpc, common_pb2, queue_pb2, runs_pb2
from takeoff_rpc.channels import open_channel
from tests.agent.conftest import (
    GROUP,
    LEASE_TTL_SECONDS,
    WAITER,
    Stack,
    StartAgent,
    code_job,
    group_pids,
    job_pid,
    running_agent,
    wait_gone,
)
from tests.keys import ADMIN_KEY
from tests.processes import pid_alive, wait_for
from tests.queue.harness import struct

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
RUNNING = common_pb2.ITEM_STATE_RUNNING

TRAIN = """\
import os
os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # the tests count the job's own rows; a slow start would add one
import takeoff
run = takeoff.init(config={"epochs": 2})
print("hello from the job", run.config["epochs"])
for i in range(5):
    run.log({"loss": 1 / (i + 1)})
run.summary["best"] = 0.2
run.finish()
"""

SLEEPER = """\
import os, time, takeoff
run = takeoff.init()
print("pid", os.getpid(), flush=True)
time.sleep(float(os.environ.get("SLEEP", "600")))
print("woke up", flush=True)
"""


def test_a_code_job_runs_and_reports(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "train", TRAIN)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert (item.state, item.exit_code) == (SUCCEEDED, 0)
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FINISHED
    assert run.history_length == 5
    assert run.summary["best"] == 0.2
    assert "hello from the job 2" in stack.logs(item.run)
    assert [t.to_state for t in item.transitions] == [
        common_pb2.ITEM_STATE_PENDING,
        common_pb2.ITEM_STATE_LEASED,
        common_pb2.ITEM_STATE_BUILDING,
        common_pb2.ITEM_STATE_STARTING,
        RUNNING,
        SUCCEEDED,
    ]


def test_a_failing_job_reports_its_exit_code_and_last_lines(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "fails", "import sys\nprint('about to fail')\nsys.exit(3)\n")
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert (item.state, item.reason, item.exit_code) == (FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, 3)
    assert "about to fail" in item.message
    run = stack.run(item.run)
    assert (run.state, run.exit_code) == (common_pb2.RUN_STATE_FAILED, 3)


def test_a_job_that_never_calls_init_is_no_run(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "silent", "print('forgot to init')\n")
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_NO_RUN)
    assert "never called takeoff.init()" in item.message
    assert stack.run(item.run).state == common_pb2.RUN_STATE_FAILED


def test_an_import_error_before_init_lands_in_the_runs_logs(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "broken", "import not_a_module_anywhere\n")
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert (item.state, item.exit_code) == (FAILED, 1)
    logs = stack.logs(item.run)
    assert any("Traceback" in line for line in logs)
    assert any("ModuleNotFoundError: No module named 'not_a_module_anywhere'" in line for line in logs)


def test_cancel_while_running_stops_the_process_group(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "cancelled", GROUP)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        name = stack.enqueue(queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
        stack.wait_state(name, RUNNING)
        pids = group_pids(tmp_path / "pids.json")
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)

        assert item.state == CANCELLED
        wait_gone(pids)  # the child ignores SIGTERM: it takes the group's SIGKILL after the grace
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_max_run_time_stops_the_process_group(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "overtime", GROUP)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        name = stack.enqueue(
            queue,
            job,
            run_config=struct({"pids": str(tmp_path / "pids.json")}),
            max_run_time={"seconds": 10},
            max_attempts=1,
        )
        pids = group_pids(tmp_path / "pids.json")
        item = stack.wait_ended(name, timeout=60)

        assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_MAX_RUN_TIME_EXCEEDED)
        wait_gone(pids)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_a_revoked_lease_stops_the_process_group(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "revoked", GROUP)
    kept_queue, doomed_queue = stack.new_queue(), stack.new_queue()
    with running_agent(start_agent, [kept_queue, doomed_queue]) as agent:
        name = stack.enqueue(doomed_queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
        run = stack.wait_state(name, RUNNING).run
        pids = group_pids(tmp_path / "pids.json")
        # Deleting a queue with live items revokes their leases (QUEUE_DELETED).
        stack.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=doomed_queue, force=True))

        wait_gone(pids)
        leases = agent.state_dir / "leases"
        wait_for(lambda: not any(leases.iterdir()), timeout=60, what="the revoked lease to be dropped")
    assert stack.run(run).state == common_pb2.RUN_STATE_KILLED


def test_a_job_whose_shim_dies_is_stopped_and_reported(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "unsupervised", GROUP)
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]) as agent:
        name = stack.enqueue(queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
        stack.wait_state(name, RUNNING)
        pids = group_pids(tmp_path / "pids.json")
        [lease_dir] = list((agent.state_dir / "leases").iterdir())
        os.kill(json.loads((lease_dir / "shim.json").read_text())["shim_pid"], signal.SIGKILL)
        item = stack.wait_ended(name, timeout=60)

        assert (item.state, item.exit_code) == (FAILED, 137)
        assert item.reason == common_pb2.FAILURE_REASON_JOB_FAILED
        wait_gone(pids)  # no job runs on without its shim
    assert stack.run(item.run).state == common_pb2.RUN_STATE_CRASHED


def test_agent_killed_for_good_the_next_agent_runs_attempt_two(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "orphan", SLEEPER)
    queue = stack.new_queue(max_attempts=3)
    first = start_agent([queue])
    name = stack.enqueue(queue, job)
    running = stack.wait_state(name, RUNNING)
    pid = job_pid(stack, running.run)
    first.kill()

    with running_agent(start_agent, [queue], drain_timeout_seconds=1):
        second = stack.wait_until(name, lambda item: item.attempt == 2, "to be retried", timeout=60)
        lost = [t for t in second.transitions if t.reason == common_pb2.FAILURE_REASON_AGENT_LOST]
        assert [t.attempt for t in lost] == [1]
        # The lost agent's job stopped itself once its lease lapsed (the shim fences it).
        wait_for(lambda: not pid_alive(pid), timeout=LEASE_TTL_SECONDS + 15, what="the orphan to stop")
        # Back, the first agent learns its lease was given away and drops what is left of it.
        lease_dirs = list((first.state_dir / "leases").iterdir())
        assert len(lease_dirs) == 1
        with running_agent(start_agent, [queue], state_dir=first.state_dir, drain_timeout_seconds=1):
            wait_for(lambda: not lease_dirs[0].exists(), timeout=30, what="the revoked lease to be dropped")
        assert stack.item(name).attempt == 2
        assert stack.run(running.run).state == common_pb2.RUN_STATE_KILLED  # attempt 2 has its own run


@pytest.mark.timeout(300)  # ten one-second jobs, two at a time on each agent, on a loaded machine
def test_max_jobs_with_two_agents_and_ten_items(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "napper", SLEEPER.replace('"600"', '"1"'))
    queue = stack.new_queue()
    with running_agent(start_agent, [queue], max_jobs=2), running_agent(start_agent, [queue], max_jobs=2):

        def both_connected() -> bool:
            listed = stack.queues.ListAgents(queue_pb2.ListAgentsRequest(queue=queue)).agents
            return sum(1 for agent in listed if agent.connected) == 2

        wait_for(both_connected, what="both agents to connect")
        names = [stack.enqueue(queue, job) for _ in range(10)]
        items = [stack.wait_ended(name, timeout=240) for name in names]

    assert all(item.state == SUCCEEDED for item in items)
    # Each item's lease, from the queue's own record: who held it, from its grant to its outcome.
    leases = [
        (leased.agent, leased.time.ToNanoseconds(), ended.time.ToNanoseconds())
        for item in items
        for leased, ended in [(item.transitions[1], item.transitions[-1])]
    ]
    assert all(item.transitions[1].to_state == common_pb2.ITEM_STATE_LEASED for item in items)
    holders = {agent for agent, _, _ in leases}
    assert len(holders) == 2  # both agents served the queue

    def most_held_at_once(agent: str) -> int:
        held = [(start, end) for holder, start, end in leases if holder == agent]
        return max(sum(1 for start, end in held if start <= moment < end) for moment, _ in held)

    assert {agent: most_held_at_once(agent) for agent in holders} == dict.fromkeys(holders, 2)


def test_sigterm_drains_the_agent(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "drained", WAITER)
    queue = stack.new_queue()
    go = tmp_path / "go-drain"
    agent = start_agent([queue], max_jobs=2)
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    stack.wait_state(name, RUNNING)

    agent.process.send_signal(signal.SIGTERM)

    def draining() -> bool:
        listed = stack.queues.ListAgents(queue_pb2.ListAgentsRequest(queue=queue)).agents
        return any(listed_agent.draining for listed_agent in listed)

    wait_for(draining, what="the queue service to know the agent drains")
    # The agent still runs its job and has a free slot, but takes nothing new.
    unserved = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    go.touch()
    assert agent.process.wait(timeout=60) == 0  # once the running job has ended and been reported
    assert stack.item(name).state == SUCCEEDED
    assert "done waiting" in stack.logs(stack.item(name).run)
    assert [t.to_state for t in stack.item(unserved).transitions] == [common_pb2.ITEM_STATE_PENDING]


def test_metric_rows_and_logs_arrive_for_a_run(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "metrics", TRAIN)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))
    rows = [
        row
        for batch in stack.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=item.run))
        for row in batch.rows
    ]
    assert [row.values["loss"] for row in rows] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_a_git_job_runs_from_its_pinned_commit(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git[:1], "init", "-q", "-b", "main", str(source)], check=True)
    (source / "main.py").write_text(TRAIN.replace("hello from the job", "hello from git"))
    subprocess.run([*git, "-C", str(source), "add", "main.py"], check=True)
    subprocess.run([*git, "-C", str(source), "commit", "-q", "-m", "first"], check=True)
    client.create_job_version(
        "from-git", GitSource(f"file://{source}", "main"), entrypoint=["python", "main.py"]
    )
    (source / "main.py").write_text("raise SystemExit('a later commit must not run')\n")
    subprocess.run([*git, "-C", str(source), "commit", "-q", "-am", "second"], check=True)

    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, "from-git"))

    assert item.state == SUCCEEDED
    assert "hello from git 2" in stack.logs(item.run)


def test_agent_status_lists_its_work_and_drain_stops_it(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "watched", WAITER)
    queue = stack.new_queue()
    go = tmp_path / "go-status"
    agent = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    stack.wait_state(name, RUNNING)

    with open_channel(agent.address, api_key=ADMIN_KEY) as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        status = agents.GetStatus(agent_pb2.GetStatusRequest())
        assert status.connected
        assert [(w.item, w.state) for w in status.work] == [(name, RUNNING)]
        drained = agents.Drain(agent_pb2.DrainRequest(wait=False))
        assert [w.item for w in drained.work] == [name]
        assert agents.GetStatus(agent_pb2.GetStatusRequest()).draining
    go.touch()
    assert agent.process.wait(timeout=60) == 0  # a drained agent exits once its work is done
    assert stack.item(name).state == SUCCEEDED


WARM_TRAIN = TRAIN + 'print("warm:", b"serve_warm" + b"_forks" in open("/proc/self/cmdline", "rb").read())\n'
"""TRAIN, saying whether it ran in a fork of its venv's warm interpreter (runners/shims.py)."""


@pytest.mark.parametrize("warm_start", [True, False])
def test_the_jobs_after_a_venvs_first_run_warm_and_report_as_it_did(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, warm_start: bool
) -> None:
    """The first job of a venv starts as before and has the agent start the venv's warm interpreter; once
    that is ready (its imports take a moment), the next ones run in forks of it, unless the runner's
    ``warm_start`` is false (docs/design.md §7 "Warm interpreters")."""
    job = code_job(client, tmp_path, "warm", WARM_TRAIN)
    queue = stack.new_queue()
    said = []
    with running_agent(start_agent, [queue], runners={"local-process": {"warm_start": warm_start}}):
        for _ in range(40 if warm_start else 5):
            item = stack.wait_ended(stack.enqueue(queue, job))
            assert (item.state, item.exit_code) == (SUCCEEDED, 0)
            logs = stack.logs(item.run)
            said.append("warm: True" in logs)
            if said[-1]:
                break
    assert said[0] is False
    assert said[-1] is warm_start
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FINISHED
    assert (run.history_length, run.summary["best"]) == (5, 0.2)
    assert "hello from the job 2" in logs
