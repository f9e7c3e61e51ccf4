"""``takeoff items describe ITEM --trace``: the item's timeline from its stored transitions, and where its
trace is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from takeoff.cli._output import console
from takeoff.cli.queue_commands import print_item_trace
from takeoff.models import Item
from takeoff.v1 import common_pb2, queue_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ENQUEUED = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def _at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(ENQUEUED + timedelta(seconds=seconds))
    return stamp


def _item(traceparent: str) -> Item:
    steps = [
        (0.0, common_pb2.ITEM_STATE_PENDING, 0),
        (0.25, common_pb2.ITEM_STATE_LEASED, 1),
        (0.5, common_pb2.ITEM_STATE_BUILDING, 1),
        (42.5, common_pb2.ITEM_STATE_STARTING, 1),
        (43.0, common_pb2.ITEM_STATE_RUNNING, 1),
        (100.0, common_pb2.ITEM_STATE_SUCCEEDED, 1),
    ]
    return Item._from_proto(
        queue_pb2.Item(
            name="projects/p/queues/q/items/abc",
            state=common_pb2.ITEM_STATE_SUCCEEDED,
            traceparent=traceparent,
            transitions=[
                queue_pb2.ItemTransition(
                    time=_at(seconds), to_state=state, attempt=attempt, agent="agents/a1"
                )
                for seconds, state, attempt in steps
            ],
        )
    )


def _printed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, item: Item) -> str:
    monkeypatch.setattr(console, "width", 160)
    print_item_trace(item)
    return capsys.readouterr().out


def test_the_timeline_shows_how_long_each_step_took(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    out = _printed(capsys, monkeypatch, _item(f"00-{TRACE_ID}-00f067aa0ba902b7-01"))

    rows = [line for line in out.splitlines() if "agents/a1" in line or "PENDING" in line]
    building = next(line for line in rows if "BUILDING" in line)
    starting = next(line for line in rows if "STARTING" in line)
    assert "0.250s" in building  # the lease took 0.25 s
    assert "0.500s" in building  # since enqueue
    assert "42.0s" in starting  # the build took 42 s
    assert "42.5s" in starting
    assert "57.0s" in next(line for line in rows if "SUCCEEDED" in line)
    assert f"trace {TRACE_ID}: set OTEL_TRACES_EXPORTER=otlp" in " ".join(out.split())


def test_with_an_otlp_endpoint_it_says_where_the_trace_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317")
    out = " ".join(_printed(capsys, monkeypatch, _item(f"00-{TRACE_ID}-00f067aa0ba902b7-01")).split())

    assert (
        f"are exported to http://jaeger:4317; look the trace up there by its id (Jaeger: /trace/{TRACE_ID}"
        in out
    )


def test_an_item_without_a_trace_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "no trace" in _printed(capsys, monkeypatch, _item(""))
