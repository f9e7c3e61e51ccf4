"""The agent ends a relayed run from what its run relay saw (docs/design.md §8 "The run relay"): a job that
attached and finished its run through the relay costs the registry no GetRun (did it attach?) and, when the
run keeps all the agent would add, no FinishRun from the agent. Calls are counted on the registry's own
metrics (``grpc_server_handling_seconds_count`` by method); the job's relayed FinishRun counts there too.
Without the relay, the agent asks and finishes as it always did."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2, runs_pb2
from takeoff_agent.relay import RunEnds
from tests.agent.conftest import Stack, StartAgent, code_job, running_agent
from tests.processes import ServiceProcess, service_process

FINISHED_WITH_EXIT_CODE = """\
import takeoff
run = takeoff.init()
run.log({"x": 1.0})
run.finish(exit_code=0)
"""
FINISHED_AT_EXIT = """\
import takeoff
takeoff.init().log({"x": 1.0})
"""
NEVER_ATTACHED = "print('no takeoff.init()')\n"


@pytest.fixture(scope="module")
def metrics_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def registry(home: Path, metrics_address: str) -> Iterator[ServiceProcess]:
    """The module's registry, serving its metrics: each test counts the RunService calls a run cost."""
    with service_process("registry", home, env={"TAKEOFF_METRICS_LISTEN": metrics_address}) as process:
        yield process
        process.terminate()


def run_calls(metrics_address: str) -> dict[str, float]:
    """RunService calls the registry answered OK so far, by method."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["grpc_method"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handling_seconds_count"
        and sample.labels.get("grpc_service") == "takeoff.v1.RunService"
        and sample.labels.get("grpc_code") == "OK"
    }


def launch_counting(
    stack: Stack, start_agent: StartAgent, metrics_address: str, job: str, **settings: object
) -> tuple[queue_pb2.Item, dict[str, float]]:
    """Run ``job`` on an agent with ``settings``: its item once ended, and the RunService calls (by
    method) the registry answered from its enqueue to its end."""
    queue = stack.new_queue()
    with running_agent(start_agent, [queue], **settings):
        before = run_calls(metrics_address)
        item = stack.wait_ended(stack.enqueue(queue, job))
        after = run_calls(metrics_address)
    return item, {method: after[method] - before.get(method, 0) for method in after}


def test_a_relayed_run_its_job_ended_costs_no_getrun_nor_finishrun_from_the_agent(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, metrics_address: str
) -> None:
    job = code_job(client, tmp_path, "ended-by-job", FINISHED_WITH_EXIT_CODE)
    item, calls = launch_counting(stack, start_agent, metrics_address, job)

    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    # The job's attach and finish, through the relay; nothing from the agent at the run's end.
    assert (calls.get("AttachRun"), calls.get("GetRun", 0), calls.get("FinishRun")) == (1, 0, 1)
    run = stack.run(item.run)
    assert (run.state, run.exit_code) == (common_pb2.RUN_STATE_FINISHED, 0)


def test_a_relayed_run_finished_at_exit_is_given_its_exit_code_by_the_agent_without_a_getrun(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, metrics_address: str
) -> None:
    """The SDK's finish at exit knows no exit code: the agent's FinishRun still records it (the registry
    keeps the job's state and takes the first exit code), but the attach it saw answers GetRun's question."""
    job = code_job(client, tmp_path, "ended-at-exit", FINISHED_AT_EXIT)
    item, calls = launch_counting(stack, start_agent, metrics_address, job)

    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    assert (calls.get("AttachRun"), calls.get("GetRun", 0), calls.get("FinishRun")) == (1, 0, 2)
    run = stack.run(item.run)
    assert (run.state, run.HasField("exit_code"), run.exit_code) == (common_pb2.RUN_STATE_FINISHED, True, 0)


def test_without_the_relay_the_agent_asks_and_finishes_the_run_itself(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, metrics_address: str
) -> None:
    job = code_job(client, tmp_path, "ended-directly", FINISHED_WITH_EXIT_CODE)
    item, calls = launch_counting(stack, start_agent, metrics_address, job, run_relay=False)

    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    # The job's own finish, then the agent's GetRun and FinishRun (which keeps the job's state).
    assert (calls.get("AttachRun"), calls.get("GetRun", 0), calls.get("FinishRun")) == (1, 1, 2)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_FINISHED


def test_a_relayed_job_that_never_attached_is_asked_about_and_fails_no_run(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path, metrics_address: str
) -> None:
    job = code_job(client, tmp_path, "never-attached", NEVER_ATTACHED)
    item, calls = launch_counting(stack, start_agent, metrics_address, job)

    assert (item.state, item.reason) == (common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_NO_RUN)
    assert (calls.get("AttachRun", 0), calls.get("GetRun", 0), calls.get("FinishRun")) == (0, 1, 1)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_FAILED


def test_run_ends_keep_only_watched_runs_past_starting_and_their_first_end() -> None:
    ends, name = RunEnds(), "projects/p/runs/r"
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_RUNNING))
    assert ends.seen(name) is None  # no attempt watches it: nothing kept

    ends.watch(name)
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_STARTING))
    assert ends.seen(name) is None  # a STARTING reply may be stale once the job attached directly
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_RUNNING))
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_FINISHED, message="done"))
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_RUNNING))  # an earlier reply, late
    seen = ends.seen(name)
    assert seen is not None
    assert (seen.state, seen.ended, seen.has_exit_code, seen.has_message) == (
        common_pb2.RUN_STATE_FINISHED,
        True,
        False,
        True,
    )

    ends.forget(name)  # the attempt ended
    ends.saw(runs_pb2.Run(name=name, state=common_pb2.RUN_STATE_FINISHED))
    assert ends.seen(name) is None
