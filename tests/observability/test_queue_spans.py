"""The queue's spans of an item's life (services/takeoff_queue/tracing.py), recorded from its committed
transitions: the waits and the attempts under the Enqueue's context, with ids the Assignment can name
before the span exists and a retry's link to the attempt before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from takeoff_queue import lifecycle, tracing
from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, RetryPolicy
from takeoff_queue.model import Item, Priority, SourceKind
from takeoff_server import telemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ENQUEUE_SPAN = "00f067aa0ba902b7"
START = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
RETRY = RetryPolicy(retry_job_failures=True)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=telemetry._ChosenIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(telemetry._Exporting, "spans", True)
    yield exporter
    provider.shutdown()


class Life:
    """An item living through the life cycle, its transitions committed (and traced) as they come."""

    def __init__(self, traceparent: str = f"00-{TRACE_ID}-{ENQUEUE_SPAN}-01") -> None:
        self.now = START
        life = lifecycle.enqueued("i1", 3, START)
        self.item = Item(
            "i1", "projects/p/queues/q", "projects/p/jobs/j", "projects/p/jobs/j/versions/0", b"",
            SourceKind.CODE, {}, [], {}, {}, {}, Priority.MEDIUM, life, traceparent=traceparent,
        )  # fmt: skip

    def move(self, seconds: float, change: object) -> None:
        self.now += timedelta(seconds=seconds)
        before = len(self.item.life.history)
        life = change(self.item.life, self.now)  # type: ignore[operator]
        assert isinstance(life, ItemLife)
        self.item.life = life
        tracing.committed(self.item, life.history, before)

    def attempt(self, outcome: ItemState, reason: FailureReason | None = None) -> None:
        attempt = self.item.life.attempt + 1
        self.move(
            2, lambda life, now: lifecycle.assign(life, "agents/a1", now, run=f"projects/p/runs/i1-{attempt}")
        )
        epoch = self.item.life.epoch
        for state in (ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING):
            self.move(1, lambda life, now, state=state: lifecycle.progress(life, epoch, state, now))
        self.move(5, lambda life, now: lifecycle.complete(life, epoch, outcome, now, RETRY, reason=reason))


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def _seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None
    assert span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


def test_each_wait_and_attempt_is_a_span_under_the_enqueue(spans: InMemorySpanExporter) -> None:
    life = Life()
    life.attempt(ItemState.FAILED, FailureReason.JOB_FAILED)
    life.attempt(ItemState.SUCCEEDED)

    first, second = _named(spans, "takeoff.attempt")
    waits = _named(spans, "takeoff.queue.pending")
    assert len(waits) == 2
    for span in (first, second, *waits):
        assert span.parent is not None
        assert (f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}") == (TRACE_ID, ENQUEUE_SPAN)
    assert [_seconds(span) for span in (waits[0], first, waits[1], second)] == [2, 8, 2, 8]
    assert [event.name for event in first.events] == ["BUILDING", "STARTING", "RUNNING"]
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes is not None
    assert (first.attributes["takeoff.outcome"], first.attributes["takeoff.reason"]) == (
        "PENDING",
        "JOB_FAILED",
    )
    assert second.status.status_code is StatusCode.UNSET
    assert waits[1].attributes is not None
    assert (waits[1].attributes["takeoff.attempt"], waits[1].attributes["takeoff.retry_reason"]) == (
        2,
        "JOB_FAILED",
    )
    # The Assignment named each attempt's span before it existed; the retry links to the attempt before.
    for attempt, span in ((1, first), (2, second)):
        assert tracing.attempt_traceparent(life.item, attempt).split("-")[2] == f"{span.context.span_id:016x}"
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert not first.links


def test_the_same_history_gives_the_same_spans_after_a_restart(spans: InMemorySpanExporter) -> None:
    life = Life()
    life.attempt(ItemState.SUCCEEDED)
    [recorded] = _named(spans, "takeoff.attempt")
    spans.clear()

    # A restarted queue knows the item from the store: the attempt's end is recorded from the history.
    tracing.committed(life.item, life.item.life.history, len(life.item.life.history) - 1)
    [again] = _named(spans, "takeoff.attempt")
    assert (again.context.span_id, again.start_time, again.end_time) == (
        recorded.context.span_id,
        recorded.start_time,
        recorded.end_time,
    )


def test_an_item_without_a_trace_records_nothing(spans: InMemorySpanExporter) -> None:
    Life(traceparent="").attempt(ItemState.SUCCEEDED)
    assert spans.get_finished_spans() == ()
