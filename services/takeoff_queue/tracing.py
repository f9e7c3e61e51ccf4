"""The queue's spans of an item's life, recorded from its stored transitions (docs/design.md §9).

The Enqueue's trace context, stored on the item, is the parent of everything the item causes. For each
attempt the queue records ``takeoff.queue.pending`` (from the enqueue or the re-queue to the assignment:
the wait is a span, not a gap) and ``takeoff.attempt`` (from the assignment to the attempt's end, its
progress as events, linked to the attempt before). Both are recorded once their end is committed, from
the item's history, with ids derived from the item and the attempt: the Assignment tells the agent the
attempt span's id before the span exists, the link to the previous attempt needs nothing stored, and a
queue restarted meanwhile records the same span from the same history.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from takeoff_queue.lifecycle import ItemState, Transition
from takeoff_queue.model import Item
from takeoff_server.telemetry import derived_span_id, exporting, parent_context, record_span, with_span_id

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("takeoff.queue")


def attempt_traceparent(item: Item, attempt: int) -> str:
    """The traceparent of the item's ``attempt`` span, for its Assignment: the agent's spans go under it.
    Empty when the item has no trace."""
    return with_span_id(item.traceparent, derived_span_id(item.traceparent, item.id, "attempt", attempt))


def _pending_traceparent(item: Item, attempt: int) -> str:
    return with_span_id(item.traceparent, derived_span_id(item.traceparent, item.id, "pending", attempt))


@contextlib.contextmanager
def pending(item: Item) -> Iterator[None]:
    """Calls made inside (minting the next attempt's run token) belong to the item's current wait."""
    context = parent_context(_pending_traceparent(item, item.life.attempt + 1))
    if context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def committed(item: Item, history: Sequence[Transition], since: int) -> None:
    """Record the spans that the transitions ``history[since:]``, just committed, end."""
    if not exporting() or not item.traceparent:
        return
    try:
        _record(item, history, since)
    except Exception:  # spans are for people to read: never worth a dispatch
        logger.warning("could not record the spans of %s", item.name, exc_info=True)


def _record(item: Item, history: Sequence[Transition], since: int) -> None:
    for index in range(since, len(history)):
        transition = history[index]
        if transition.from_state is ItemState.PENDING:
            _record_pending(item, history, index)
        elif (
            transition.from_state is not None
            and transition.from_state.is_live
            and (transition.to_state is ItemState.PENDING or transition.to_state.is_terminal)
        ):
            _record_attempt(item, history, index)


def _attributes(item: Item, attempt: int) -> dict[str, AttributeValue]:
    return {
        "takeoff.project": item.queue.rsplit("/queues/", 1)[0],
        "takeoff.queue": item.queue,
        "takeoff.item": item.name,
        "takeoff.attempt": attempt,
    }


def _ns(time: datetime) -> int:
    return int(time.timestamp() * 1e9)


def _record_pending(item: Item, history: Sequence[Transition], index: int) -> None:
    """The wait that ``history[index]`` ends: by an assignment, or by a cancel while it waited."""
    end = history[index]
    start = next((t for t in reversed(history[:index]) if t.to_state is ItemState.PENDING), None)
    if start is None:
        return
    attempt = end.attempt if end.to_state is ItemState.LEASED else end.attempt + 1
    attributes = _attributes(item, attempt)
    if start.reason is not None:
        attributes["takeoff.retry_reason"] = start.reason.value  # why the previous attempt is retried
    record_span(
        _tracer,
        "takeoff.queue.pending",
        parent=item.traceparent,
        span_id=derived_span_id(item.traceparent, item.id, "pending", attempt),
        start_ns=_ns(start.time),
        end_ns=_ns(end.time),
        attributes=attributes,
        error=None if end.to_state is ItemState.LEASED else f"{end.to_state.value} while pending",
    )


def _record_attempt(item: Item, history: Sequence[Transition], index: int) -> None:
    """The attempt that ``history[index]`` ends, with its progress as events."""
    end = history[index]
    steps = [t for t in history[:index] if t.attempt == end.attempt and t.epoch == end.epoch]
    start = next((t for t in steps if t.to_state is ItemState.LEASED), None)
    if start is None:
        return
    attributes = _attributes(item, end.attempt)
    attributes.update(
        {
            "takeoff.agent": end.agent,
            "takeoff.run": end.run,
            "takeoff.outcome": end.to_state.value,
        }
    )
    if end.reason is not None:
        attributes["takeoff.reason"] = end.reason.value
    record_span(
        _tracer,
        "takeoff.attempt",
        parent=item.traceparent,
        span_id=derived_span_id(item.traceparent, item.id, "attempt", end.attempt),
        start_ns=_ns(start.time),
        end_ns=_ns(end.time),
        attributes=attributes,
        links=[attempt_traceparent(item, end.attempt - 1)] if end.attempt > 1 else [],
        events=[
            (t.to_state.value, _ns(t.time), {"takeoff.detail": t.message} if t.message else {})
            for t in steps
            if t is not start
        ],
        error=None
        if end.to_state is ItemState.SUCCEEDED
        else f"{end.reason.value if end.reason else end.to_state.value}: {end.message}"[:1024],
    )
