"""Prometheus metrics for a server process, served over HTTP at ``metrics_listen`` (docs/design.md §9).

Each process collects into a :class:`~prometheus_client.CollectorRegistry` of its own, never the library's
global one, so that several servers in one test process keep their numbers apart. Every server has the
RPC metrics of :class:`RpcMetrics` (latency by method and status code, streams in flight) and the
process's CPU and memory; a service adds its own by returning them in its ``Wiring.metrics``, made with
:func:`counter`, :func:`gauge`, :func:`histogram` (which leave them unregistered) or, for values read when
scraped, :class:`CallbackGauge`.

The HTTP endpoint runs on the event loop, not in a thread: callbacks read the service's in-memory state
on the loop that changes it, so they see it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from takeoff_server.interceptors import Context, Handler, call_unary, handler_parts, responses

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds: from a cached in-memory read (well under a millisecond) to a slow dependency."""
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Seconds: for work such as builds, from a cache hit to an hour-long image build."""

_MAX_REQUEST_HEAD_BYTES = 16 * 1024
_READ_TIMEOUT_SECONDS = 10.0


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    """A counter for a service's ``Wiring.metrics`` (unregistered until the process serves it)."""
    return Counter(name, documentation, labels, registry=None)


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
    return Gauge(name, documentation, labels, registry=None)


def histogram(
    name: str, documentation: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
) -> Histogram:
    return Histogram(name, documentation, labels, buckets=buckets, registry=None)


class CallbackGauge(Collector):
    """A gauge whose values ``read`` returns when scraped: ``{label values: value}``, or one number when
    the gauge has no labels. For what the service already knows (queue depths, leases held), so that
    nothing has to be kept in step with it. ``read`` runs on the event loop (the endpoint takes a
    snapshot there before it formats the page in a worker thread), so it may read the loop's state."""

    def __init__(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Mapping[tuple[str, ...], float] | float],
        labels: Sequence[str] = (),
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read
        self._labels = list(labels)
        self._snapshot: Mapping[tuple[str, ...], float] | float | None = None

    def snapshot(self) -> None:
        """Read the values now, for the next :meth:`collect` (which may run in another thread)."""
        self._snapshot = self._read()

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labels)
        values = self._read() if self._snapshot is None else self._snapshot
        self._snapshot = None
        if isinstance(values, Mapping):
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
        else:
            family.add_metric([], values)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, labels=self._labels)


_CALL_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class RpcMetrics:
    """Every call's latency and status code, and the calls in flight, by gRPC service and method.

    The names and labels are those of go-grpc-prometheus, so existing dashboards read them; the latency
    histogram carries the code too, so one series answers both "how slow" and "how often it fails".
    """

    def __init__(self) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.handling = histogram(
            "grpc_server_handling_seconds",
            "Time from a call's arrival to its status, streams included, by method and status code.",
            (*labels, "grpc_code"),
        )
        self.in_flight = gauge(
            "grpc_server_in_flight", "Calls under way (open streams included), by method.", labels
        )

    @property
    def collectors(self) -> tuple[Collector, ...]:
        return (self.handling, self.in_flight)


class _Measure:
    """Measures the calls of one method; the label children are looked up once, not per call."""

    def __init__(self, metrics: RpcMetrics, service: str, method: str, kind: str) -> None:
        self._labels = (service, method, kind)
        self._handling = metrics.handling
        self._by_code: dict[grpc.StatusCode, Any] = {}
        self._in_flight = metrics.in_flight.labels(*self._labels)

    def started(self) -> float:
        self._in_flight.inc()
        return time.perf_counter()

    def ended(self, start: float, code: grpc.StatusCode) -> None:
        self._in_flight.dec()
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handling.labels(*self._labels, code.name)
        child.observe(time.perf_counter() - start)


def _finished(context: Context) -> grpc.StatusCode:
    """The status of a call whose handler returned: OK unless it set another with ``set_code``."""
    code = context.code()
    return grpc.StatusCode.OK if code is None else _status_code(code)


def _outcome(error: BaseException, context: Context) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client went away
        return grpc.StatusCode.CANCELLED
    if isinstance(error, grpc.aio.AbortError):
        return _status_code(context.code())
    return grpc.StatusCode.UNKNOWN


def measured_handler(handler: Handler, method: str, metrics: RpcMetrics) -> Handler:
    """``handler`` with each call's latency, status code and time in flight recorded in ``metrics``.
    Plain wrappers rather than a context manager: this runs on every call of every method."""
    service, _, name = method.lstrip("/").rpartition("/")
    measure = _Measure(
        metrics, service, name, _CALL_TYPES[(handler.request_streaming, handler.response_streaming)]
    )
    behavior, serializers = handler_parts(handler, method)
    if handler.response_streaming:

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            start = measure.started()
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in responses(behavior, request, context):
                    yield response
                code = _finished(context)
            except BaseException as error:
                code = _outcome(error, context)
                raise
            finally:
                measure.ended(start, code)

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)

    async def unary(request: Any, context: Context) -> Any:
        start = measure.started()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await call_unary(behavior, request, context)
            code = _finished(context)
            return response
        except BaseException as error:
            code = _outcome(error, context)
            raise
        finally:
            measure.ended(start, code)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)


def _status_code(value: object) -> grpc.StatusCode:
    """What ``context.code()`` reports: a StatusCode, or its number when the status was set as one."""
    if isinstance(value, grpc.StatusCode):
        return value
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


def process_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry of this process's own: its CPU and memory, and ``collectors``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsEndpoint:
    """``GET /metrics`` (and ``/``) over HTTP/1.1, one request per connection: Prometheus and curl need
    nothing more. The callback gauges are read on the event loop; the rest is collected and formatted in a
    worker thread (prometheus_client's metrics take locks), because a page of a few hundred histogram
    series costs tens of milliseconds, which the loop's calls must not wait for."""

    def __init__(self, registry: CollectorRegistry, listen: str, callbacks: Iterable[Collector] = ()) -> None:
        self._registry = registry
        self._callbacks = [collector for collector in callbacks if isinstance(collector, CallbackGauge)]
        self._scraping = asyncio.Lock()
        self._listen = listen
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Listen; returns ``host:port`` with the real port number."""
        host, _, port = self._listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(self._answer, host.strip("[]"), int(port))
        except OSError as error:
            raise OSError(f"cannot serve metrics on {self._listen}: {error.strerror}") from None
        bound_port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{bound_port}"
        logger.info("serving metrics on http://%s/metrics", self.address)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        try:
            status, content_type, body = await self._respond(head[:_MAX_REQUEST_HEAD_BYTES])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path not in ("/metrics", "/"):
            return "404 Not Found", "text/plain", b"metrics are at /metrics\n"
        accept = next(
            (line.partition(":")[2].strip() for line in header_lines if line.lower().startswith("accept:")),
            "",
        )
        encoder, content_type = choose_encoder(accept)
        async with self._scraping:  # one snapshot of the callbacks per page
            for gauge in self._callbacks:
                gauge.snapshot()
            return "200 OK", content_type, await asyncio.to_thread(encoder, self._registry)
