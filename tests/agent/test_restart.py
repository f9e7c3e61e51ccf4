"""An agent killed (-9) and started again with its state directory, while its job runs on under its shim.

The lease TTL here is far longer than any restart takes, however loaded the machine: each test forces the
case it names by what it does (a kill, a queue deleted while the agent is away), not by racing the TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2, runs_pb2
from tests.agent.conftest import (
    GROUP,
    WAITER,
    Stack,
    StartAgent,
    code_job,
    group_pids,
    job_pid,
    running_agent,
    wait_gone,
)
from tests.processes import pid_alive, wait_for
from tests.queue.harness import struct

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED

COUNTER = """\
import itertools, os, time, takeoff
run = takeoff.init()
for number in itertools.count():
    print(number, flush=True)
    if os.path.exists(run.config["stop"]):
        break
    time.sleep(0.01)
print(f"printed {number + 1} numbers", flush=True)
"""
"""Numbered lines, one every 10 ms, until the file named by its ``stop`` config exists; then their count."""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    return 300.0


def test_a_restarted_agent_takes_its_running_job_back(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "survivor", WAITER)
    queue = stack.new_queue()
    go = tmp_path / "go"
    first = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    running = stack.wait_state(name, RUNNING)
    pid = job_pid(stack, running.run)

    first.kill()
    assert pid_alive(pid)  # the job lives on under its shim
    with running_agent(start_agent, [queue], state_dir=first.state_dir) as second:
        second.wait_working_on(name, RUNNING)  # its Hello held the lease, and the queue kept it
        assert pid_alive(pid)
        go.touch()  # the job finishes; the restarted agent reports it
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1)
    assert [t.to_state for t in item.transitions].count(SUCCEEDED) == 1
    assert not [t for t in item.transitions if t.reason == common_pb2.FAILURE_REASON_AGENT_LOST]
    assert "done waiting" in stack.logs(item.run)  # output written while the agent was away is kept


def test_each_line_a_job_prints_arrives_once_and_in_order_across_agent_restarts(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "counter", COUNTER)
    queue = stack.new_queue()
    stop = tmp_path / "stop"
    agent = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"stop": str(stop)}))
    run = stack.wait_state(name, RUNNING).run

    def printed() -> list[str]:
        return [line.text for line in stack.log_lines(run) if line.stream == runs_pb2.LOG_STREAM_STDOUT]

    def numbers() -> list[int]:
        return [int(text) for text in printed() if text.isdigit()]

    def printed_beyond(count: int) -> Callable[[], bool]:
        return lambda: len(numbers()) > count

    wait_for(printed_beyond(50), timeout=60, what="the job's first lines")
    for _ in range(2):  # a kill amid the job's output, from the first agent and from a restarted one
        agent.kill()
        seen = len(numbers())
        agent = start_agent([queue], state_dir=agent.state_dir)
        agent.wait_working_on(name, RUNNING)
        wait_for(printed_beyond(seen + 100), timeout=60, what="lines sent after the restart")
    stop.touch()
    item = stack.wait_ended(name, timeout=60)
    agent.terminate()

    assert item.state == SUCCEEDED
    received = numbers()
    assert received == list(range(len(received)))  # none lost, none twice, in order
    assert printed()[-1] == f"printed {len(received)} numbers"  # nor any lost at the end


RELAYED_ACROSS_A_RESTART = """\
import os, sys, time, takeoff
os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # no call of its own while the agent is away
run = takeoff.init()
run.log({"before": 1.0})
while not os.path.exists(run.config["go"]):
    time.sleep(0.01)
run.log({"after": 2.0})
run.finish()
print("GRPC LOADED", "grpc" in sys.modules, flush=True)
"""
"""A run that logs a row through the agent's relay, waits for the file its ``go`` config names, then logs
another and finishes."""


def test_a_relayed_run_goes_on_through_the_restarted_agents_relay(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "relayed-restart", RELAYED_ACROSS_A_RESTART)
    queue = stack.new_queue()
    go = tmp_path / "go"
    first = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    run = stack.wait_state(name, RUNNING).run
    # The row and then its summary delivered: the job makes no call until ``go``.
    wait_for(lambda: "before" in stack.run(run).summary, what="the first row and its summary")
    first.kill()  # the job's connection to the relay breaks; it notices on its next call
    with running_agent(start_agent, [queue], state_dir=first.state_dir) as second:
        second.wait_working_on(name, RUNNING)
        go.touch()
        item = stack.wait_ended(name, timeout=60)

    assert item.state == SUCCEEDED
    finished = stack.run(run)
    assert (finished.state, finished.history_length) == (common_pb2.RUN_STATE_FINISHED, 2)
    # The restarted agent's relay (the same name) took the calls: the job never fell back to gRPC.
    logs = stack.logs(run)
    assert "GRPC LOADED False" in logs, logs[-8:]  # the job's last lines and the agent's, on a failure


def test_a_job_whose_lease_was_given_away_while_its_agent_was_down_is_stopped_when_it_returns(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "given-away", GROUP)
    kept_queue, doomed_queue = stack.new_queue(), stack.new_queue()
    first = start_agent([kept_queue, doomed_queue])
    name = stack.enqueue(doomed_queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
    run = stack.wait_state(name, RUNNING).run
    pids = group_pids(tmp_path / "pids.json")
    [lease_dir] = list((first.state_dir / "leases").iterdir())

    first.kill()
    # The queue and its item go while the agent is away: its lease is no longer held by anyone.
    stack.queues.DeleteQueue(queue_pb2.DeleteQueueRequest(name=doomed_queue, force=True))
    assert all(pid_alive(pid) for pid in pids.values())  # nothing has stopped the job yet
    with running_agent(start_agent, [kept_queue], state_dir=first.state_dir):
        wait_gone(pids)
        wait_for(lambda: not lease_dir.exists(), timeout=60, what="the given-away lease to be dropped")

    # Closed by the queue as it deleted the item, or by the agent that stopped the job: whichever came first.
    assert stack.run(run).state == common_pb2.RUN_STATE_KILLED


def test_a_job_its_shim_stopped_while_the_agent_was_away_is_reported_if_the_queue_kept_the_lease(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "fenced", GROUP)
    queue = stack.new_queue(max_attempts=1)
    first = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
    stack.wait_state(name, RUNNING)
    pids = group_pids(tmp_path / "pids.json")
    [lease_dir] = list((first.state_dir / "leases").iterdir())

    first.kill()
    # As the shim reads it, the agent's last renewal is long past: it stops the job (self-fencing), while
    # the queue, whose TTL is far off, still holds the lease for the agent.
    (lease_dir / "lease_until").write_text("0")
    wait_gone(pids)
    with running_agent(start_agent, [queue], state_dir=first.state_dir):
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_AGENT_LOST)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_the_job_of_a_lease_directory_a_restarted_agent_cannot_read_is_stopped_and_removed(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "unreadable", GROUP)
    queue = stack.new_queue(max_attempts=1)
    first = start_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"pids": str(tmp_path / "pids.json")}))
    stack.wait_state(name, RUNNING)
    pids = group_pids(tmp_path / "pids.json")
    [lease_dir] = list((first.state_dir / "leases").iterdir())

    first.kill()
    (lease_dir / "assignment.bin").write_bytes(b"\xff not an assignment")  # say, a disk that lost it
    with running_agent(start_agent, [queue], state_dir=first.state_dir):
        # Not listed in the Hello, so the queue ends the attempt; its job is an orphan the sweep stops.
        wait_gone(pids)
        wait_for(lambda: not lease_dir.exists(), timeout=60, what="the unreadable lease to be removed")
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_AGENT_LOST)
