"""Prometheus metrics: the server runtime's RPC metrics on a real server, and every service of a real stack
scraped over HTTP after a launch (docs/design.md §9, "Metrics")."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from takeoff.stack import LocalStack
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.access import CachedVerifier
from takeoff_server.config import ConfigError, ServerSettings, load_settings
from takeoff_server.metrics import CallbackGauge, MetricsEndpoint, RpcMetrics, counter, process_registry
from takeoff_server.server import TakeoffServer
from tests.e2e.test_up import takeoff as takeoff_cli
from tests.processes import until
from tests.unit.test_server_runtime import KEYS, PROBE, KeyTable, probe_binding

READ_ON: list[int] = []
"""The threads the probe's callback gauge was read on."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample ``http://address/metrics`` serves, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


async def unary_call(channel: grpc.aio.Channel, method: str) -> bytes:
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{PROBE}/{method}")
    return await stub(b"", timeout=5)


class Probe:
    def __init__(self, server: TakeoffServer, metrics_address: str) -> None:
        self.server = server
        self.metrics_address = metrics_address

    async def scrape(self) -> Samples:
        return await asyncio.to_thread(scrape, self.metrics_address)


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    rpc = RpcMetrics()
    launches = counter("probe_launches_total", "Launches, for the test.", ["kind"])
    launches.labels("venv").inc(3)
    depths: dict[tuple[str, ...], float] = {("q1",): 4.0, ("q2",): 0.0}

    def read_depths() -> dict[tuple[str, ...], float]:
        READ_ON.append(threading.get_ident())
        return depths

    own = [launches, CallbackGauge("probe_depth", "Depth.", read_depths, ["queue"])]
    registry = process_registry([*rpc.collectors, *own])
    server = TakeoffServer(
        [probe_binding()], listen=["127.0.0.1:0"], verifier=CachedVerifier(KeyTable(KEYS)), rpc_metrics=rpc
    )
    endpoint = MetricsEndpoint(registry, "127.0.0.1:0", own)
    await endpoint.start()
    await server.start()
    yield Probe(server, endpoint.address)
    await server.stop(0)
    await endpoint.stop()


async def test_rpc_latency_is_counted_by_method_and_status_code_and_open_streams_are_in_flight(
    probe: Probe,
) -> None:
    [address] = probe.server.addresses
    async with open_aio_channel(address, api_key="sesame") as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{PROBE}/WhoAmI")
        for _ in range(3):
            await echo(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await unary_call(channel, "Missing")
        with pytest.raises(grpc.aio.AioRpcError):
            await unary_call(channel, "Crash")
        opener: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{PROBE}/Open")
        open_stream = opener(b"", timeout=30)
        assert await open_stream.read() == b"first"

        samples = await probe.scrape()
        unary = {"grpc_service": PROBE, "grpc_type": "unary"}
        count = "grpc_server_handling_seconds_count"
        assert value(samples, count, **unary, grpc_method="WhoAmI", grpc_code="OK") == 3
        assert value(samples, count, **unary, grpc_method="Missing", grpc_code="NOT_FOUND") == 1
        assert value(samples, count, **unary, grpc_method="Crash", grpc_code="INTERNAL") == 1
        stream = {"grpc_service": PROBE, "grpc_method": "Open", "grpc_type": "server_stream"}
        assert value(samples, "grpc_server_in_flight", **stream) == 1
        assert value(samples, "grpc_server_in_flight", **unary, grpc_method="WhoAmI") == 0
        bucket = value(
            samples,
            "grpc_server_handling_seconds_bucket",
            **unary,
            grpc_method="WhoAmI",
            grpc_code="OK",
            le="+Inf",
        )
        assert bucket == 3

        open_stream.cancel()

    async def stream_ended() -> bool:
        # The server learns of the cancel after the client: wait for it, not for a time.
        return value(await probe.scrape(), "grpc_server_in_flight", **stream) == 0

    await until(stream_ended, "the server to end the cancelled stream", within=10)
    samples = await probe.scrape()
    assert value(samples, count, **stream, grpc_code="CANCELLED") == 1


async def test_a_services_own_metrics_and_the_process_are_served(probe: Probe) -> None:
    READ_ON.clear()
    samples = await probe.scrape()
    assert [threading.get_ident()] == READ_ON  # the event loop's thread, though the page is made in another
    assert value(samples, "probe_launches_total", kind="venv") == 3
    assert value(samples, "probe_depth", queue="q1") == 4
    assert value(samples, "probe_depth", queue="q2") == 0
    assert value(samples, "process_resident_memory_bytes") is not None


async def test_the_endpoint_answers_only_get_of_metrics(probe: Probe) -> None:
    def status(path: str, method: str = "GET") -> int:
        request = urllib.request.Request(f"http://{probe.metrics_address}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert await asyncio.to_thread(status, "/metrics") == 200
    assert await asyncio.to_thread(status, "/elsewhere") == 404
    assert await asyncio.to_thread(status, "/metrics", "POST") == 405


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalStack, Path]]:
    """A stack whose every service serves metrics on a free port (the children inherit the setting)."""
    monkeypatch.setenv("TAKEOFF_METRICS_LISTEN", "127.0.0.1:0")
    home = tmp_path / "home"
    stack = LocalStack(home, base_port=0)
    stack.start()
    try:
        yield stack, home
    finally:
        stack.stop()


def metrics_addresses(home: Path) -> dict[str, str]:
    """Where each service serves its metrics, as `takeoff status --json` tells."""
    status = takeoff_cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    return {name: service["metrics_address"] for name, service in json.loads(status.stdout).items()}


def test_every_service_of_a_stack_serves_its_metrics_after_a_launch(
    stack: tuple[LocalStack, Path], tmp_path: Path
) -> None:
    local_stack, home = stack
    created = takeoff_cli(home, "queue", "create", "metrics", "--resource", "local-process")
    assert created.returncode == 0, created.stderr
    config = home / "agent.yaml"
    config.write_text("name: metrics-agent\nqueues: [metrics]\nmax_jobs: 1\n")
    local_stack.start_agent(config)
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("import takeoff\n\ntakeoff.init().finish()\n")
    created = takeoff_cli(
        home, "job", "create", str(code), "--name", "measured", "--entrypoint", "python train.py"
    )
    assert created.returncode == 0, created.stderr

    launched = takeoff_cli(home, "launch", "measured", "--queue", "metrics", "--wait", timeout=120)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "SUCCEEDED" in launched.stdout

    addresses = metrics_addresses(home)
    scraped = {service: scrape(addresses[service]) for service in ("registry", "queue", "builder", "agent")}
    ok = {"grpc_code": "OK"}
    count = "grpc_server_handling_seconds_count"

    def calls(service: str, grpc_service: str, method: str, kind: str = "unary") -> float:
        labels = {"grpc_service": grpc_service, "grpc_method": method, "grpc_type": kind, **ok}
        return value(scraped[service], count, **labels) or 0

    assert calls("registry", "takeoff.v1.JobService", "CreateJobVersion") >= 1
    assert calls("registry", "takeoff.v1.JobService", "GetJobVersion") >= 1  # the queue's and the builder's
    assert calls("registry", "takeoff.v1.RunService", "CreateRun") >= 1  # the agent's
    assert calls("queue", "takeoff.v1.QueueService", "Enqueue") == 1
    assert calls("builder", "takeoff.v1.BuildService", "Build", "server_stream") == 1
    assert calls("agent", "grpc.health.v1.Health", "Check") >= 1  # the stack's readiness probe
    stream = {"grpc_service": "takeoff.v1.QueueService", "grpc_method": "Lease", "grpc_type": "bidi_stream"}
    assert value(scraped["queue"], "grpc_server_in_flight", **stream) == 1  # the agent's lease stream

    builder = scraped["builder"]
    assert value(builder, "takeoff_builder_builds_started_total", kind="venv") == 1
    assert value(builder, "takeoff_builder_builds_finished_total", kind="venv", outcome="succeeded") == 1
    assert value(builder, "takeoff_builder_cache_lookups_total", kind="venv", result="miss") == 1
    for service, samples in scraped.items():
        assert value(samples, "process_resident_memory_bytes"), service

    queue = scraped["queue"]
    [assigned] = series(queue, "takeoff_queue_assignments_total")  # one queue had work
    assert assigned["queue"].endswith("metrics"), assigned
    for name, expected in (
        ("takeoff_queue_enqueues_total", 1),
        ("takeoff_queue_assignments_total", 1),
        ("takeoff_queue_dispatch_seconds_count", 1),
        ("takeoff_queue_depth", 0),
        ("takeoff_queue_running", 0),
        ("takeoff_queue_leases_held", 0),
    ):
        assert value(queue, name, **assigned) == expected, name


def test_a_wrong_metrics_address_is_one_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_METRICS_LISTEN", "9464")
    with pytest.raises(ConfigError) as raised:
        load_settings(ServerSettings)
    assert (
        str(raised.value)
        == "invalid configuration: TAKEOFF_METRICS_LISTEN: '9464' is not host:port (got '9464')"
    )
    monkeypatch.setenv("TAKEOFF_METRICS_LISTEN", "")
    assert load_settings(ServerSettings).metrics_listen is None


async def test_a_metrics_port_in_use_is_a_clear_error(probe: Probe) -> None:
    endpoint = MetricsEndpoint(process_registry([]), probe.metrics_address)
    with pytest.raises(OSError, match=f"cannot serve metrics on {probe.metrics_address}"):
        await endpoint.start()
