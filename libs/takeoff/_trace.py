"""The job's own spans, continuing the trace of its launch (docs/design.md §9).

A launched job gets ``TRACEPARENT`` (the agent's ``agent.job`` span) and, when the agent exports spans,
``OTEL_TRACES_EXPORTER=otlp`` and the ``OTEL_EXPORTER_OTLP_*`` settings. Then ``takeoff.init``, each batch
of rows the sender delivers and ``takeoff.finish`` are spans under that parent, and every call the SDK
makes carries the current one's context, so the registry's spans of those calls nest under them.

A job's environment has no OpenTelemetry SDK, and adding it (with its exporters) to every job would cost
each job's start far more than its few spans are worth. The spans are kept here as plain records and sent
as an OTLP ``ExportTraceServiceRequest`` (the message classes of ``opentelemetry-proto``, which needs only
protobuf) over gRPC, or HTTP with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``: every
``OTEL_BSP_SCHEDULE_DELAY`` ms (default 5000) from a background thread, at ``flush`` (the run's finish)
and at exit. This module imports only the standard library, and without ``otlp`` in
``OTEL_TRACES_EXPORTER`` :func:`span` is a shared no-op: a job that is not traced pays one environment
lookup for its whole life.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

SERVICE_NAME = "takeoff-job"
"""The spans' ``service.name`` unless ``OTEL_SERVICE_NAME`` names another."""
MAX_QUEUED_SPANS = 2048
"""Spans kept while none can be sent (the OTel SDK's default queue size); later ones are dropped."""
EXPORT_TIMEOUT_SECONDS = 10.0
_NOOP: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
_INTERNAL, _CLIENT = 1, 3  # Span.SpanKind values
_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


class _Span:
    """One span, recorded in the job (a plain class: see ``takeoff_rpc.backoff.RetryPolicy`` on why no
    dataclass)."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "kind",
        "name",
        "parent_span_id",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        *,
        trace_id: bytes,
        span_id: bytes,
        parent_span_id: bytes,
        kind: int,
        attributes: dict[str, Any],
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.kind = kind
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-01"


_current: contextvars.ContextVar[_Span | None] = contextvars.ContextVar("takeoff_span", default=None)


class _Tracing:
    """The process's tracing, set up at the first :func:`span`."""

    checked = False
    enabled = False
    trace_id = b""
    parent_span_id = b""
    finished: list[_Span] = []  # guarded by the lock
    dropped = 0
    lock = threading.Lock()
    sending = threading.Lock()
    """Held through each export: the last flush (at exit) waits for one the background thread has under
    way, whose spans the process's end would otherwise lose with that daemon thread."""
    wake = threading.Event()
    pid = 0


def _enabled() -> bool:
    if not _Tracing.checked:
        _Tracing.checked = True
        exporters = os.environ.get("OTEL_TRACES_EXPORTER", "")
        if "otlp" in (name.strip() for name in exporters.split(",")):
            _Tracing.enabled = _start(os.environ.get("TRACEPARENT", ""))
    return _Tracing.enabled


def _start(traceparent: str) -> bool:
    """Take the parent from ``traceparent`` (a new trace without one), start the export thread and have
    the SDK's calls carry the current span; False when the parent was not sampled."""
    parts = traceparent.strip().split("-")
    valid = len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16 and len(parts[3]) == 2
    try:
        trace_id, span_id, flags = (bytes.fromhex(parts[1]), bytes.fromhex(parts[2]), int(parts[3], 16))
    except (ValueError, IndexError):  # not hexadecimal, or too few parts (none given): a trace of its own
        valid = False
    if valid and any(trace_id) and any(span_id):
        if not flags & 1:
            return False  # the launch's trace is not sampled: neither are the job's spans
        _Tracing.trace_id, _Tracing.parent_span_id = trace_id, span_id
    else:
        _Tracing.trace_id = _random_id(16)
    _Tracing.pid = os.getpid()
    from takeoff_rpc.channels import propagate_trace_context

    propagate_trace_context(trace_context)
    threading.Thread(target=_export_every_interval, name="takeoff-trace-export", daemon=True).start()
    atexit.register(flush)
    return True


def _random_id(size: int) -> bytes:
    while not any(value := os.urandom(size)):
        pass
    return value


def span(name: str, *, client: bool = False, **attributes: Any) -> contextlib.AbstractContextManager[None]:
    """A span around the block, a child of the current one (else of ``TRACEPARENT``); an exception
    leaving the block marks it failed. ``client``: it wraps one call to a service."""
    if not _enabled():
        return _NOOP
    return _recording(name, _CLIENT if client else _INTERNAL, attributes)


@contextlib.contextmanager
def _recording(name: str, kind: int, attributes: dict[str, Any]) -> Iterator[None]:
    parent = _current.get()
    recorded = _Span(
        name,
        trace_id=_Tracing.trace_id,
        span_id=_random_id(8),
        parent_span_id=parent.span_id if parent is not None else _Tracing.parent_span_id,
        kind=kind,
        attributes={**_launch_attributes(), **attributes},
    )
    token = _current.set(recorded)
    try:
        yield
    except BaseException as error:
        recorded.error = f"{type(error).__name__}: {error}"[:1024]
        raise
    finally:
        _current.reset(token)
        recorded.end_ns = time.time_ns()
        _finished(recorded)


def current() -> object | None:
    """The current span, for :func:`within` on another thread (None when there is none)."""
    return _current.get() if _Tracing.enabled else None


def within(recorded: object | None) -> contextlib.AbstractContextManager[None]:
    """Make ``recorded`` (from :func:`current`) the current span on this thread for the block."""
    if not isinstance(recorded, _Span):
        return _NOOP
    return _within(recorded)


@contextlib.contextmanager
def _within(recorded: _Span) -> Iterator[None]:
    token = _current.set(recorded)
    try:
        yield
    finally:
        _current.reset(token)


def trace_context() -> tuple[tuple[str, str], ...]:
    """The current span's ``traceparent`` as call metadata; empty outside a span."""
    recorded = _current.get()
    return (("traceparent", recorded.traceparent),) if recorded is not None else ()


def _launch_attributes() -> dict[str, Any]:
    project, run = os.environ.get("TAKEOFF_PROJECT", ""), os.environ.get("TAKEOFF_RUN_ID", "")
    names = {
        "takeoff.project": f"projects/{project}" if project else "",
        "takeoff.run": f"projects/{project}/runs/{run}" if project and run else "",
        "takeoff.item": os.environ.get("TAKEOFF_ITEM", ""),
        "takeoff.attempt": int(os.environ.get("TAKEOFF_ATTEMPT", "0") or 0),
    }
    return {key: value for key, value in names.items() if value}


def _finished(recorded: _Span) -> None:
    with _Tracing.lock:
        if len(_Tracing.finished) >= MAX_QUEUED_SPANS:
            _Tracing.dropped += 1
            return
        _Tracing.finished.append(recorded)


def flush(timeout: float = EXPORT_TIMEOUT_SECONDS) -> None:
    """Send the spans that have ended. Never raises: a collector that is away costs the spans, with one
    line on stderr, never the job."""
    if not _Tracing.enabled or os.getpid() != _Tracing.pid:  # a forked child leaves them to its parent
        return
    with _Tracing.sending:
        with _Tracing.lock:
            spans, _Tracing.finished = _Tracing.finished, []
            dropped, _Tracing.dropped = _Tracing.dropped, 0
        if dropped:
            _warn_once(f"{dropped} spans dropped: more than {MAX_QUEUED_SPANS} waited to be sent")
        if not spans:
            return
        try:
            _send(_export_request(spans), timeout)
        except Exception as error:  # tracing must never cost the job anything but its spans
            _warn_once(f"could not export {len(spans)} spans: {error}")


def _export_every_interval() -> None:
    try:
        interval = max(0.01, float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "5000")) / 1000)
    except ValueError:
        interval = 5.0
    while True:
        _Tracing.wake.wait(interval)
        flush()


class _Warned:
    once = False


def _warn_once(message: str) -> None:
    if not _Warned.once:
        _Warned.once = True
        print(f"takeoff: tracing: {message} (said once)", file=sys.stderr, flush=True)


def _value(value: Any) -> Any:
    from opentelemetry.proto.common.v1 import common_pb2

    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(string_value=str(value))


def _key_values(attributes: Mapping[str, Any]) -> list[Any]:
    from opentelemetry.proto.common.v1 import common_pb2

    return [common_pb2.KeyValue(key=key, value=_value(value)) for key, value in attributes.items()]


def _export_request(spans: list[_Span]) -> bytes:
    """The OTLP ``ExportTraceServiceRequest`` holding ``spans``, serialized."""
    import platform

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    resource = resource_pb2.Resource(
        attributes=_key_values(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
                "process.pid": os.getpid(),
                "process.runtime.name": platform.python_implementation().lower(),
                "process.runtime.version": platform.python_version(),
                "telemetry.sdk.name": "takeoff",
                "telemetry.sdk.language": "python",
            }
        )
    )
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource,
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        scope=common_pb2.InstrumentationScope(name="takeoff"),
                        spans=[
                            trace_pb2.Span(
                                trace_id=recorded.trace_id,
                                span_id=recorded.span_id,
                                parent_span_id=recorded.parent_span_id,
                                name=recorded.name,
                                kind=recorded.kind,  # type: ignore[arg-type]
                                start_time_unix_nano=recorded.start_ns,
                                end_time_unix_nano=recorded.end_ns,
                                attributes=_key_values(recorded.attributes),
                                status=trace_pb2.Status(code=_ERROR, message=recorded.error)  # type: ignore[arg-type]
                                if recorded.error is not None
                                else None,
                            )
                            for recorded in spans
                        ],
                    )
                ],
            )
        ]
    ).SerializeToString()


def _setting(name: str, default: str = "") -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_{name}``, else ``OTEL_EXPORTER_OTLP_{name}``, else ``default``."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}")
        or default
    )


def _headers() -> list[tuple[str, str]]:
    import urllib.parse

    pairs = (pair.partition("=") for pair in _setting("HEADERS").split(",") if "=" in pair)
    return [
        (urllib.parse.unquote(key).strip().lower(), urllib.parse.unquote(value).strip())
        for key, _, value in pairs
    ]


def _send(request: bytes, timeout: float) -> None:
    if _setting("PROTOCOL", "grpc") == "http/protobuf":
        _send_http(request, timeout)
    else:
        _send_grpc(request, timeout)


def _send_http(request: bytes, timeout: float) -> None:
    import urllib.request

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"
    )
    post = urllib.request.Request(endpoint, data=request, method="POST")
    post.add_header("Content-Type", "application/x-protobuf")
    for key, value in _headers():
        post.add_header(key, value)
    with urllib.request.urlopen(post, timeout=timeout) as answer:
        answer.read()


class _Channel:
    target = ""
    call: Any = None


def _send_grpc(request: bytes, timeout: float) -> None:
    import grpc

    endpoint = _setting("ENDPOINT", "http://localhost:4317")
    scheme, _, rest = endpoint.rpartition("://")
    target = rest.split("/", 1)[0]
    insecure = scheme == "http" or (not scheme and _setting("INSECURE", "false").lower() == "true")
    if _Channel.target != endpoint:
        if insecure:
            channel = grpc.insecure_channel(target)
        else:
            certificate = _setting("CERTIFICATE")
            roots = None
            if certificate:
                with open(certificate, "rb") as file:
                    roots = file.read()
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots))
        # A plain channel: the export call itself is not part of the job's trace.
        _Channel.call = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=None,
        )
        _Channel.target = endpoint
    _Channel.call(request, timeout=timeout, metadata=_headers() or None)
