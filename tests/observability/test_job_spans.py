"""A job's own spans (``takeoff._trace``): children of TRACEPARENT, sent as OTLP over HTTP as over gRPC, and
nothing at all, not even an import, when the job is not traced."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
JOB = """\
import sys
from takeoff import _trace
with _trace.span("work", step=3):
    with _trace.span("inner"):
        pass
try:
    with _trace.span("broken"):
        raise ValueError("no good")
except ValueError:
    pass
_trace.flush()
print(sorted(name for name in sys.modules if name.startswith(("opentelemetry", "grpc"))))
"""


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[trace_service_pb2.ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        self.received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]]]:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    thread.join()


def _exporting_to(endpoint: str) -> dict[str, str]:
    """The variables that have a job export its spans over OTLP/HTTP to ``endpoint``."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
    }


def _job(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", JOB],
        check=False,
        env={"PATH": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_traced_jobs_spans_continue_its_traceparent_over_otlp_http(
    receiver: tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]],
) -> None:
    endpoint, received = receiver
    _job(
        {
            **_exporting_to(endpoint),
            "TRACEPARENT": f"00-{TRACE_ID}-{PARENT}-01",
            "TAKEOFF_PROJECT": "p",
            "TAKEOFF_RUN_ID": "r1",
        }
    )

    [request] = received
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "takeoff-job"
    spans = {span.name: span for span in resource_spans.scope_spans[0].spans}
    assert set(spans) == {"work", "inner", "broken"}
    assert {span.trace_id.hex() for span in spans.values()} == {TRACE_ID}
    assert spans["work"].parent_span_id.hex() == spans["broken"].parent_span_id.hex() == PARENT
    assert spans["inner"].parent_span_id == spans["work"].span_id
    attributes = {a.key: a.value for a in spans["work"].attributes}
    assert attributes["step"].int_value == 3
    assert attributes["takeoff.run"].string_value == "projects/p/runs/r1"
    assert spans["broken"].status.message == "ValueError: no good"
    assert spans["work"].start_time_unix_nano <= spans["inner"].start_time_unix_nano
    assert spans["inner"].end_time_unix_nano <= spans["work"].end_time_unix_nano


@pytest.mark.parametrize("traceparent", [None, "", "00-not-a-traceparent"])
def test_a_traced_job_without_a_valid_traceparent_starts_a_trace_of_its_own(
    receiver: tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]], traceparent: str | None
) -> None:
    """Run by hand with an exporter set (no launch gave it a TRACEPARENT): its spans start a new trace."""
    endpoint, received = receiver
    _job(
        {
            **_exporting_to(endpoint),
            **({"TRACEPARENT": traceparent} if traceparent is not None else {}),
        }
    )
    [request] = received
    spans = {span.name: span for span in request.resource_spans[0].scope_spans[0].spans}
    assert set(spans) == {"work", "inner", "broken"}
    assert len({span.trace_id for span in spans.values()}) == 1
    assert spans["work"].parent_span_id == b""


def test_a_job_whose_launch_is_not_sampled_records_nothing(
    receiver: tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]],
) -> None:
    endpoint, received = receiver
    _job(
        {
            **_exporting_to(endpoint),
            "TRACEPARENT": f"00-{TRACE_ID}-{PARENT}-00",
        }
    )
    assert received == []


def test_an_untraced_job_loads_neither_grpc_nor_opentelemetry() -> None:
    assert _job({"TRACEPARENT": f"00-{TRACE_ID}-{PARENT}-01"}).strip() == "[]"


EXITING = """\
import time
from takeoff import _trace
with _trace.span("early"):
    pass
while _trace._Tracing.finished:  # until the export thread has taken it (its export is then under way)
    time.sleep(0.01)
with _trace.span("late"):
    pass
print("exiting", flush=True)
"""


def test_the_jobs_exit_waits_for_an_export_under_way() -> None:
    """The background thread's export of the first span is held by the receiver while the job's code
    ends: the job does not exit (its daemon thread, and the span, would go with it) until that export is
    answered, and its last spans follow. CI saw a launch's ``takeoff.init`` span lost so."""
    bodies: list[bytes] = []
    first_arrived, release = threading.Event(), threading.Event()

    class Holding(_Receiver):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            if len(bodies) == 1:
                first_arrived.set()
                release.wait(60)
            self.send_response(200)
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "PATH": "",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
        "TRACEPARENT": f"00-{TRACE_ID}-{PARENT}-01",
    }
    job = subprocess.Popen([sys.executable, "-c", EXITING], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert first_arrived.wait(60)
        assert job.stdout is not None
        assert job.stdout.readline() == "exiting\n"
        # Its code has ended; a job that did not wait would exit now, sending "late" beside the held export.
        with pytest.raises(subprocess.TimeoutExpired):
            job.wait(timeout=2)
        assert len(bodies) == 1
    finally:
        release.set()
        assert job.wait(timeout=60) == 0
        server.shutdown()

    names = [
        [
            span.name
            for span in trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            .resource_spans[0]
            .scope_spans[0]
            .spans
        ]
        for body in bodies
    ]
    assert names == [["early"], ["late"]]
