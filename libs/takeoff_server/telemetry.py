"""Tracing and logging for a server process.

The exporter is chosen by the standard OpenTelemetry variables: ``OTEL_TRACES_EXPORTER`` (``none``,
the default, ``otlp`` or ``console``), ``OTEL_EXPORTER_OTLP_*`` for the endpoint, ``OTEL_SERVICE_NAME``
to override the service name. Log records carry the current trace and span ids, and the request id the
error interceptor assigned, so a log line leads to its trace.

Every client channel (``takeoff_rpc.channels``) passes the current span's W3C context on, so a server's
span continues its caller's trace. Spans recorded after the fact (the queue's attempts, rebuilt from an
item's stored history) and spans a restarted process must end under the same id (the agent's span for a
job) get ids derived from what names them (:func:`derived_span_id`): a child told the id in advance finds
its parent in the trace, whichever process or restart records it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from takeoff_rpc.channels import Metadata, propagate_trace_context
from takeoff_server.call_context import request_id_var
from takeoff_server.config import ConfigError
from takeoff_server.interceptors import Context, Handler, guard_handler

_PROPAGATOR = TraceContextTextMapPropagator()
_chosen_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("chosen_span_id", default=None)


class _Exporting:
    spans = False


def _exporters() -> list[SpanExporter]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            )
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                    OTLPSpanExporter,
                )
            exporters.append(OTLPSpanExporter())
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (use none, otlp or console)")
    return exporters


class _ChosenIds(RandomIdGenerator):
    """Random ids, but the span id :func:`span_with_id` chose for the span being started."""

    def generate_span_id(self) -> int:
        chosen = _chosen_span_id.get()
        return chosen if chosen is not None else super().generate_span_id()


class _UnrecordedTracer(trace.NoOpTracer):
    """Spans with the ids, flags and trace state the SDK would give them, recording nothing: a trace's ids
    still reach the items, runs and log lines, and the spans of services that do export still join their
    callers' traces."""

    def __init__(self, ids: IdGenerator) -> None:
        self._ids = ids

    def start_span(
        self, name: str, context: otel_context.Context | None = None, *args: Any, **kwargs: Any
    ) -> Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            return NonRecordingSpan(
                SpanContext(
                    self._ids.generate_trace_id(),
                    self._ids.generate_span_id(),
                    is_remote=False,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )
            )
        return NonRecordingSpan(
            SpanContext(
                parent.trace_id,
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=parent.trace_flags,
                trace_state=parent.trace_state,
            )
        )


class _UnrecordedTracerProvider(trace.NoOpTracerProvider):
    def __init__(self) -> None:
        self._tracer = _UnrecordedTracer(_ChosenIds())

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self._tracer


def setup_tracing(service_name: str) -> Callable[[], None]:
    """Install a tracer provider named for the service, exporting where ``OTEL_*`` says, and have every
    client channel pass the current trace context on; returns what flushes the spans still batched.

    With nothing to export to, spans carry their ids and record nothing: the SDK records every span it
    samples whether or not anything exports it, about 0.1 ms of CPU on every call a server answers."""
    propagate_trace_context(current_trace_context)
    exporters = _exporters()
    _Exporting.spans = bool(exporters)
    if not exporters:
        trace.set_tracer_provider(_UnrecordedTracerProvider())
        return lambda: None
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)}),
        id_generator=_ChosenIds(),
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def traced_handler(handler: Handler, method: str) -> Handler:
    """``handler`` with each call in a span of its caller's trace (its ``traceparent`` and ``tracestate``)
    or of a new one, for a server whose spans nothing exports: the context OpenTelemetry's gRPC interceptor
    gives a call, without the work it spends on a span nobody sees (attributes, the peer's address, the
    status: about 75 µs of CPU a call). A server that exports keeps that interceptor."""
    tracer = trace.get_tracer(__name__)

    @contextlib.asynccontextmanager
    async def in_callers_trace(method: str, context: Context) -> AsyncIterator[None]:
        carrier = {key: value for key, value in context.invocation_metadata() or () if key in _TRACE_KEYS}
        parent = _PROPAGATOR.extract(carrier)
        span = tracer.start_span(method, parent, kind=trace.SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield
        finally:
            otel_context.detach(token)

    return guard_handler(handler, method, in_callers_trace)


_TRACE_KEYS = frozenset({"traceparent", "tracestate"})


def exporting() -> bool:
    """Whether spans go anywhere: spans recorded only for others to see are skipped otherwise."""
    return _Exporting.spans


def current_trace_context() -> Metadata:
    """The current span's ``traceparent`` (and ``tracestate``), as call metadata; empty outside a span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return ()
    parent = _traceparent(span_context.trace_id, span_context.span_id, span_context.trace_flags)
    if span_context.trace_state:
        return (parent, ("tracestate", span_context.trace_state.to_header()))
    return (parent,)


@functools.lru_cache(maxsize=1024)
def _traceparent(trace_id: int, span_id: int, flags: int) -> tuple[str, str]:
    """Formatted once per span: a span's calls (a stream's messages aside) reuse it."""
    return ("traceparent", f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}")


def parent_context(traceparent: str) -> otel_context.Context | None:
    """The context whose span ``traceparent`` names, to start children in; None when it names none."""
    if not traceparent:
        return None
    found = _PROPAGATOR.extract({"traceparent": traceparent})
    return found if trace.get_current_span(found).get_span_context().is_valid else None


def derived_span_id(traceparent: str, *names: object) -> int:
    """A span id that ``names`` (an item, an attempt, what the span is) fix within the trace of
    ``traceparent``: whoever records that span, now or after a restart, gives it this id."""
    digest = hashlib.blake2b("\0".join(map(str, (traceparent, *names))).encode(), digest_size=8).digest()
    return int.from_bytes(digest) or 1  # 0 is the invalid span id


_SPAN_TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})[ \t]*")
"""A traceparent of four fields, as the W3C propagator reads one (which also zero ids and version ff fail)."""


def with_span_id(traceparent: str, span_id: int) -> str:
    """``traceparent`` naming another span of the same trace; empty when ``traceparent`` names none.
    Checked as the propagator checks it, without building the context it would (a dispatch makes one)."""
    found = _SPAN_TRACEPARENT.fullmatch(traceparent)
    if found is None or found[1] == "ff" or not int(found[2], 16) or not int(found[3], 16):
        return ""
    version, trace_id, _, flags = found.groups()
    return f"{version}-{trace_id}-{span_id:016x}-{flags}"


@contextlib.contextmanager
def span_with_id(span_id: int) -> Iterator[None]:
    """Spans started inside get ``span_id`` (see :func:`derived_span_id`)."""
    token = _chosen_span_id.set(span_id)
    try:
        yield
    finally:
        _chosen_span_id.reset(token)


def record_span(
    tracer: trace.Tracer,
    name: str,
    *,
    parent: str,
    span_id: int,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, AttributeValue],
    links: Sequence[str] = (),
    events: Sequence[tuple[str, int, Mapping[str, AttributeValue]]] = (),
    error: str | None = None,
) -> None:
    """Record a span that is over already (what a stored history tells), under ``parent`` (a
    traceparent) with the id ``span_id``, linked to the spans ``links`` names (traceparents)."""
    context = parent_context(parent)
    if context is None or not _Exporting.spans:
        return
    linked = [
        trace.Link(trace.get_current_span(found).get_span_context())
        for link in links
        if (found := parent_context(link)) is not None
    ]
    with span_with_id(span_id):
        span = tracer.start_span(
            name, context, attributes=attributes, links=linked, start_time=start_ns, record_exception=False
        )
    for event, time_ns, event_attributes in events:
        span.add_event(event, event_attributes, timestamp=time_ns)
    if error is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=end_ns)


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Calls made inside carry no trace context: frequent background calls (log shipping) that would
    bury a trace in spans."""
    token = otel_context.attach(otel_context.Context())
    try:
        yield
    finally:
        otel_context.detach(token)


class _TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        trace_id = f"{context.trace_id:032x}" if context.is_valid else ""
        request_id = request_id_var.get() or ""
        ids = " ".join(
            f"{key}={value}" for key, value in (("trace", trace_id), ("request", request_id)) if value
        )
        record.__dict__.update(
            trace_id=trace_id,
            span_id=f"{context.span_id:016x}" if context.is_valid else "",
            request_id=request_id,
            ids=f" [{ids}]" if ids else "",
        )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self._service = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id", "request_id"):
            if value := getattr(record, key, ""):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(service_name: str, level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service_name))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service_name} %(name)s: %(message)s%(ids)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
