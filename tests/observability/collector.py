"""An OTLP trace receiver in the test process: the OTLP gRPC TraceService (``opentelemetry-proto``) on a
loopback port, keeping every span it is sent with the ``service.name`` of the process that sent it."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

T = TypeVar("T")


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def trace(self) -> str:
        return self.span.trace_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {
            a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
            for a in self.span.attributes
        }

    @property
    def failed(self) -> bool:
        return self.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.address = ""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                received.extend(ReceivedSpan(service, span) for span in scope_spans.spans)
        with self._changed:
            self.spans.extend(received)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def env(self) -> dict[str, str]:
        """What a process needs to export its spans here at once."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.address}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def wait_until(
        self, found: Callable[[list[ReceivedSpan]], T | None], what: str, timeout: float = 60
    ) -> T:
        """``found(spans)`` once it is neither None nor False, re-checked as each export arrives."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (value := found(list(self.spans))):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({f"{s.service}:{s.name}" for s in self.spans})
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; spans: {names}")
                self._changed.wait(remaining)
            return value


@contextmanager
def running_collector() -> Iterator[Collector]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.address = f"127.0.0.1:{port}"
    try:
        yield collector
    finally:
        server.stop(grace=None)


def main() -> None:
    """``python -m tests.observability.collector``: a receiver in a process of its own (for benchmarks,
    whose timing a receiver in the same interpreter would disturb). Prints its address, serves until its
    stdin closes, then prints how many spans it received."""
    with running_collector() as collector:
        print(collector.address, flush=True)
        sys.stdin.read()
        print(len(collector.spans), flush=True)


if __name__ == "__main__":
    main()
