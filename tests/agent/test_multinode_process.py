"""Multi-node launches on local-process (docs/design.md §12): ``nodes: 2`` runs two ranks on the agent's
host under one shim, through real registry, queue, builder and agent processes.

The lease TTL is far longer than an agent restart takes: the restart test forces its case by the kill, not
by racing the TTL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2, runs_pb2
from tests.agent.conftest import PROJECT, Stack, StartAgent, code_job, running_agent, wait_gone
from tests.processes import pid_alive, wait_for
from tests.queue.harness import struct

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multinode"
TWO_RANKS = struct({"nodes": 2})

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED

WAITING_RANKS = """\
import os, time, takeoff
run = takeoff.init()
print("pid", os.getpid(), flush=True)
while not os.path.exists(run.config["go"]):
    time.sleep(0.1)
print("done waiting", flush=True)
"""
"""Every rank prints its pid, then waits for the file named by the ``go`` config."""

RANK_ONE_FAILS = """\
import os, sys, time, takeoff
run = takeoff.init()
ready = run.config["ready"]
if os.environ["RANK"] == "0":
    with open(ready + ".partial", "w") as file:
        file.write(str(os.getpid()))
    os.replace(ready + ".partial", ready)
    time.sleep(600)
while not os.path.exists(ready):
    time.sleep(0.05)
print("rank 1 gives up", flush=True)
sys.exit(1)
"""
"""Rank 0 writes its pid to the ``ready`` file and would sleep for 10 minutes; rank 1 then exits 1."""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    return 300.0


def lines_by_rank(stack: Stack, run: str) -> dict[int | None, list[str]]:
    """The run's log lines, by the rank they are labelled with (None: the agent's and the build's)."""
    ranks: dict[int | None, list[str]] = {}
    for line in stack.log_lines(run):
        ranks.setdefault(line.rank if line.HasField("rank") else None, []).append(line.text)
    return ranks


def rank_pids(stack: Stack, run: str) -> dict[str, int]:
    """The pid each rank printed as ``pid N`` into the run's log, once both have."""

    def find() -> dict[str, int] | None:
        pids = {
            f"rank {rank}": int(text.split()[1])
            for rank, texts in lines_by_rank(stack, run).items()
            for text in texts
            if rank is not None and text.startswith("pid ")
        }
        return pids if len(pids) == 2 else None

    return wait_for(find, timeout=90, what="both ranks to print their pids")


def test_the_example_on_two_ranks_writes_one_run_with_each_ranks_output(
    stack: Stack, client: Client, start_agent: StartAgent
) -> None:
    client.create_job_version("multinode", EXAMPLE, entrypoint=["python", "train.py"])
    queue = stack.new_queue(resource_config=TWO_RANKS, max_attempts=1)
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, "multinode"))

    assert (item.state, item.exit_code) == (SUCCEEDED, 0), item.message
    run = stack.run(item.run)
    assert (run.state, run.summary["sum_of_ranks"]) == (common_pb2.RUN_STATE_FINISHED, 1)
    logs = lines_by_rank(stack, item.run)
    assert "rank 0: sum of ranks 1" in logs[0]
    assert "rank 1: sum of ranks 1" in logs[1]
    assert not any("sum of ranks" in text for text in logs[None])
    runs = stack.runs.ListRuns(runs_pb2.ListRunsRequest(parent=f"projects/{PROJECT}", queue_item=item.name))
    assert [found.name for found in runs.runs] == [item.run]  # rank 1 ran the SDK disabled


def test_a_failing_rank_fails_the_attempt_and_stops_the_other(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "rank-fails", RANK_ONE_FAILS)
    queue = stack.new_queue(resource_config=TWO_RANKS, max_attempts=1)
    ready = tmp_path / "ready"
    with running_agent(start_agent, [queue]):
        name = stack.enqueue(queue, job, run_config=struct({"ready": str(ready)}))
        started = wait_for(lambda: ready.exists() and ready.read_text(), timeout=90, what="rank 0 to start")
        rank_zero = int(str(started))
        item = stack.wait_ended(name, timeout=60)  # rank 0 alone would sleep for 10 minutes

        assert (item.state, item.reason, item.exit_code) == (FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, 1)
        assert item.message.startswith("rank 1: exit code 1")
        assert "rank 1 gives up" in item.message
        wait_gone({"rank 0": rank_zero})
    # Rank 0's SDK ends the run itself when the shim stops it (SIGTERM), before the agent would.
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_cancel_stops_every_rank(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "ranks-cancelled", WAITING_RANKS)
    queue = stack.new_queue(resource_config=TWO_RANKS)
    with running_agent(start_agent, [queue]):
        name = stack.enqueue(queue, job, run_config=struct({"go": str(tmp_path / "never")}))
        pids = rank_pids(stack, stack.wait_state(name, RUNNING).run)
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)

        assert item.state == CANCELLED
        wait_gone(pids)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_a_restarted_agent_takes_every_rank_back(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "ranks-survive", WAITING_RANKS)
    queue = stack.new_queue(resource_config=TWO_RANKS)
    go = tmp_path / "go"
    first = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    run = stack.wait_state(name, RUNNING).run
    pids = rank_pids(stack, run)

    first.kill()
    assert all(pid_alive(pid) for pid in pids.values())  # the ranks live on under their shim
    with running_agent(start_agent, [queue], state_dir=first.state_dir) as second:
        second.wait_working_on(name, RUNNING)
        go.touch()  # both ranks finish; the restarted agent reports the attempt
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1), item.message
    logs = lines_by_rank(stack, run)
    assert (logs[0].count("done waiting"), logs[1].count("done waiting")) == (1, 1)
