"""One trace from Enqueue to the job's own code (docs/design.md §9): the spans of every process a launch
touches (queue, registry, builder, agent, the job), received by an OTLP receiver in the test."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from takeoff.cli import main
from takeoff.cli._output import console
from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2
from tests.agent.conftest import Stack, StartAgent, code_job, running_agent
from tests.keys import ADMIN_KEY
from tests.observability.collector import Collector, ReceivedSpan
from tests.queue.harness import struct

TRAIN = """\
import os, sys, takeoff
run = takeoff.init()
for i in range(3):
    run.log({"loss": 1 / (i + 1)})
if run.config.get("fail_first") and os.environ["TAKEOFF_ATTEMPT"] == "1":
    sys.exit(3)
run.finish()
"""
"""Logs three rows and finishes; with ``fail_first``, its first attempt exits 3 instead."""


def _trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def _one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [span for span in spans if span.service == service and span.name == name]
    assert len(found) == 1, f"{service}:{name}: {len(found)} spans"
    return found[0]


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan, service: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.parent == parent.id and span.service == service]


@pytest.fixture
def job(client: Client, tmp_path: Path) -> str:
    return code_job(client, tmp_path, "traced", TRAIN)


@pytest.fixture
def describe_trace(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[str], str]:
    """What ``takeoff items describe ITEM --trace`` prints."""
    monkeypatch.setenv("TAKEOFF_REGISTRY", stack.registry)
    monkeypatch.setenv("TAKEOFF_QUEUE_ADDRESS", stack.queue_address)
    monkeypatch.setenv("TAKEOFF_API_KEY", ADMIN_KEY)
    monkeypatch.setattr(console, "width", 200)

    def describe(item: str) -> str:
        monkeypatch.setattr(sys, "argv", ["takeoff", "items", "describe", item, "--trace"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        assert not exited.value.code
        return " ".join(capsys.readouterr().out.split())

    return describe


def test_a_launch_is_one_trace_from_enqueue_to_the_jobs_finish(
    stack: Stack,
    start_agent: StartAgent,
    collector: Collector,
    job: str,
    describe_trace: Callable[[str], str],
) -> None:
    queue = stack.new_queue()
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))
    assert item.state == common_pb2.ITEM_STATE_SUCCEEDED
    trace_id = _trace_id(item.traceparent)

    def whole(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
        ours = [span for span in spans if span.trace == trace_id]
        names = {span.name for span in ours}
        wanted = {"takeoff.attempt", "agent.attempt", "takeoff.finish", "agent.finish_run"}
        # The registry's own spans of the job's calls too: its exporter sends them on its own schedule.
        served = {span.name for span in ours if span.service == "takeoff-registry"}
        calls = {"/takeoff.v1.RunService/AttachRun", "/takeoff.v1.RunService/FinishRun"}
        return ours if wanted <= names and calls <= served else None

    spans = collector.wait_until(whole, "the launch's spans")
    assert {span.service for span in spans} == {
        "takeoff-queue",
        "takeoff-registry",
        "takeoff-builder",
        "takeoff-agent",
        "takeoff-job",
    }

    attempt = _queue_spans(spans, item)
    job_span = _agent_spans(spans, item, attempt)
    _job_spans(spans, job_span)

    # The run's log names the trace, and so does `takeoff items describe ITEM --trace`.
    assert f"[takeoff] trace {trace_id}" in stack.logs(item.run)
    described = describe_trace(item.name)
    assert f"trace {trace_id}: the spans of every process it touched" in described
    assert f"are exported to http://{collector.address}" in described


def _queue_spans(spans: list[ReceivedSpan], item: queue_pb2.Item) -> ReceivedSpan:
    """Enqueue (the queue's registry calls inside it), the wait, the attempt; returns the attempt."""
    enqueue = _one(spans, "takeoff-queue", "/takeoff.v1.QueueService/Enqueue")
    assert _children(spans, enqueue, "takeoff-registry"), "the queue's registry calls join the Enqueue"
    pending = _one(spans, "takeoff-queue", "takeoff.queue.pending")
    attempt = _one(spans, "takeoff-queue", "takeoff.attempt")
    assert pending.parent == attempt.parent == enqueue.id
    assert attempt.attributes["takeoff.item"] == item.name
    assert attempt.attributes["takeoff.attempt"] == 1
    assert attempt.attributes["takeoff.run"] == item.run
    assert attempt.attributes["takeoff.agent"] == item.agent
    assert attempt.attributes["takeoff.outcome"] == "SUCCEEDED"
    assert [event.name for event in attempt.span.events] == ["BUILDING", "STARTING", "RUNNING"]
    return attempt


def _agent_spans(spans: list[ReceivedSpan], item: queue_pb2.Item, attempt: ReceivedSpan) -> ReceivedSpan:
    """The agent's, under the queue's attempt, and the builder's under its build; returns the job's."""
    agent = _one(spans, "takeoff-agent", "agent.attempt")
    assert agent.parent == attempt.id
    assert agent.attributes["takeoff.run"] == item.run
    create = _one(spans, "takeoff-agent", "agent.create_run")
    build = _one(spans, "takeoff-agent", "agent.build")
    job_span = _one(spans, "takeoff-agent", "agent.job")
    finish_run = _one(spans, "takeoff-agent", "agent.finish_run")
    assert create.parent == build.parent == job_span.parent == finish_run.parent == agent.id
    assert _one(spans, "takeoff-agent", "agent.start").parent == job_span.id
    assert job_span.attributes["process.exit.code"] == 0
    created = _children(spans, create, "takeoff-registry")
    assert [span.name for span in created] == ["/takeoff.v1.RunService/CreateRun"]
    [built] = _children(spans, build, "takeoff-builder")
    assert built.name == "/takeoff.v1.BuildService/Build"
    build_root = _one(spans, "takeoff-builder", "build")  # the builder's own spans (docs/design.md §6)
    assert build_root.parent == built.id
    assert build_root.attributes["takeoff.build_key"]
    steps = {span.name for span in _children(spans, build_root, "takeoff-builder")}
    assert {"build.resolve", "build.fetch_source", "build.install"} <= steps
    return job_span


def _job_spans(spans: list[ReceivedSpan], job_span: ReceivedSpan) -> None:
    """The job's own, under the agent's span of the job; the registry's spans of its calls under them."""
    init = _one(spans, "takeoff-job", "takeoff.init")
    finish = _one(spans, "takeoff-job", "takeoff.finish")
    batches = [span for span in spans if span.service == "takeoff-job" and span.name == "takeoff.batch"]
    assert init.parent == finish.parent == job_span.id
    assert batches
    assert all(batch.parent in (job_span.id, finish.id) for batch in batches)
    assert sum(batch.attributes["takeoff.rows"] for batch in batches) == 3
    attached = _children(spans, init, "takeoff-registry")
    assert "/takeoff.v1.RunService/AttachRun" in [span.name for span in attached]
    finished = _children(spans, finish, "takeoff-registry")
    assert "/takeoff.v1.RunService/FinishRun" in [span.name for span in finished]
    for batch in batches:
        [stored] = _children(spans, batch, "takeoff-registry")
        assert stored.name == "/takeoff.v1.RunService/BatchLogMetrics"


def test_a_retried_attempt_is_a_second_attempt_span_linked_to_the_first(
    stack: Stack, start_agent: StartAgent, collector: Collector, job: str
) -> None:
    queue = stack.new_queue(retry_job_failures=True)
    with running_agent(start_agent, [queue]):
        name = stack.enqueue(queue, job, run_config=struct({"fail_first": True}))
        item = stack.wait_ended(name)
    assert (item.state, item.attempt) == (common_pb2.ITEM_STATE_SUCCEEDED, 2)
    trace_id = _trace_id(item.traceparent)

    def attempts(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
        found = [s for s in spans if s.trace == trace_id and s.name == "takeoff.attempt"]
        return sorted(found, key=lambda s: s.attributes["takeoff.attempt"]) if len(found) == 2 else None

    first, second = collector.wait_until(attempts, "both attempt spans")
    assert first.parent == second.parent
    assert first.failed
    assert first.attributes["takeoff.reason"] == "JOB_FAILED"
    assert not second.failed
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in second.span.links] == [(trace_id, first.id)]
    assert not first.span.links

    pending = [s for s in collector.spans if s.trace == trace_id and s.name == "takeoff.queue.pending"]
    retry_wait = [s for s in pending if s.attributes["takeoff.attempt"] == 2]
    assert [s.attributes.get("takeoff.retry_reason") for s in retry_wait] == ["JOB_FAILED"]
