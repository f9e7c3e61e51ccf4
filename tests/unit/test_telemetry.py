import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from takeoff_server.call_context import request_id_var
from takeoff_server.telemetry import JsonFormatter, _TraceContextFilter


def test_json_log_lines_carry_trace_span_and_request_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("takeoff.test", logging.INFO, __file__, 1, "claimed %s", ("item-1",), None)
    token = request_id_var.set("req-7")
    try:
        with tracer.start_as_current_span("dispatch") as span:
            _TraceContextFilter().filter(record)
            context = span.get_span_context()
    finally:
        request_id_var.reset(token)

    line = json.loads(JsonFormatter("takeoff-queue").format(record))

    assert line["message"] == "claimed item-1"
    assert line["service"] == "takeoff-queue"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert line["request_id"] == "req-7"


def test_log_lines_outside_a_trace_have_no_ids() -> None:
    record = logging.LogRecord("takeoff.test", logging.INFO, __file__, 1, "idle", (), None)
    _TraceContextFilter().filter(record)

    line = json.loads(JsonFormatter("takeoff-queue").format(record))

    assert "trace_id" not in line
    assert "request_id" not in line


def test_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from takeoff_server.config import ConfigError
    from takeoff_server.telemetry import _exporters

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "carrier-pigeon")
    with pytest.raises(ConfigError, match="carrier-pigeon"):
        _exporters()


def test_with_nothing_exporting_spans_carry_the_ids_the_sdk_would_give_and_record_nothing() -> None:
    from opentelemetry import trace

    from takeoff_server.telemetry import _UnrecordedTracerProvider, parent_context, span_with_id

    tracer = _UnrecordedTracerProvider().get_tracer("test")
    with tracer.start_as_current_span("root") as root:
        child = tracer.start_span("child")
    assert not root.is_recording()
    assert root.get_span_context().is_valid
    assert root.get_span_context().trace_flags.sampled
    assert child.get_span_context().trace_id == root.get_span_context().trace_id
    assert child.get_span_context().span_id != root.get_span_context().span_id

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    for flags in ("01", "00"):
        caller = parent_context(f"00-{trace_id}-00f067aa0ba902b7-{flags}")
        with span_with_id(0x1234):
            server = tracer.start_span("/takeoff.v1.QueueService/Enqueue", caller).get_span_context()
        assert f"{server.trace_id:032x}" == trace_id
        assert server.span_id == 0x1234  # a span id chosen in advance, as the SDK's spans get it
        assert f"{int(server.trace_flags):02x}" == flags  # an unsampled caller's children stay unsampled
    assert trace.get_current_span() is trace.INVALID_SPAN
