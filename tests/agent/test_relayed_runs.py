"""A launched local-process job's run goes through its agent's run relay (docs/design.md §8 "The run relay"):
every metric row, the summary and the final state reach the registry, and the job never imports gRPC. With
the relay off, or gone, the same job reaches the registry itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2
from tests.agent.conftest import Stack, StartAgent, code_job, running_agent

ROWS = 40
REPORTING_JOB = f"""\
import os, sys
os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # the test counts the job's own rows; a slow start would add one
import takeoff
run = takeoff.init(config={{"lr": 0.5}})
for step in range({ROWS}):
    run.log({{"loss": 1.0 / (step + 1)}}, step=step)
run.summary["best"] = 0.25
run.finish()
print("GRPC LOADED", "grpc" in sys.modules, flush=True)
"""


@pytest.mark.parametrize("run_relay", [True, False])
def test_a_jobs_run_reaches_the_registry_and_only_a_relayed_one_skips_grpc(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, run_relay: bool
) -> None:
    grpc_loaded = not run_relay
    job = code_job(client, tmp_path, f"relayed-{run_relay}".lower(), REPORTING_JOB)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue], run_relay=run_relay):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    assert f"GRPC LOADED {grpc_loaded}" in stack.logs(item.run)
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FINISHED
    assert run.history_length == ROWS
    assert run.summary["best"] == 0.25
    assert run.config["lr"] == 0.5


UNREACHABLE_RELAY_JOB = """\
import os, sys, takeoff
os.environ["TAKEOFF_RELAY"] = "@takeoff-relay-nobody-listens-here"
run = takeoff.init()
run.log({"x": 1.0})
run.finish()
print("GRPC LOADED", "grpc" in sys.modules, flush=True)
"""


def test_a_job_whose_relay_does_not_answer_reaches_the_registry_itself(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "no-relay", UNREACHABLE_RELAY_JOB)
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    assert "GRPC LOADED True" in stack.logs(item.run)
    run = stack.run(item.run)
    assert (run.state, run.history_length) == (common_pb2.RUN_STATE_FINISHED, 1)
