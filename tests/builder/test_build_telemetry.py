"""The builder's trace spans and Prometheus metrics (docs/design.md §6 "Spans", §9 "Metrics"), on a real
builder and registry: a miss, a hit and a failing build."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

import takeoff
from takeoff.v1 import common_pb2
from takeoff_builder import builds
from takeoff_builder.settings import BuilderSettings
from takeoff_server.metrics import process_registry
from tests.builder.conftest import Builder, create_job
from tests.builder.served import served_builder
from tests.processes import ServiceProcess


@dataclass
class Observed:
    builder: Builder
    metrics: CollectorRegistry
    spans: InMemorySpanExporter

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(builds, "tracer", provider.get_tracer(builds.__name__))
    yield exporter
    provider.shutdown()


@pytest.fixture
async def observed(
    registry: ServiceProcess, tmp_path: Path, spans: InMemorySpanExporter
) -> AsyncIterator[Observed]:
    settings = BuilderSettings(
        home=tmp_path / "builder", listen=["127.0.0.1:0"], registry_address=registry.address
    )
    async with served_builder(settings) as served:
        yield Observed(served.builder, process_registry(served.parts.metrics.collectors), spans)


def by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    return sorted(
        span.name
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    )


async def test_a_miss_then_a_hit_are_counted_and_traced_with_their_steps(
    observed: Observed, client: takeoff.Client, project: str, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements="# a venv of its own, with nothing to install")
    first = await observed.builder.build(version)
    second = await observed.builder.build(version)
    assert not first.result.cache_hit
    assert second.result.cache_hit

    assert observed.sample("takeoff_builder_builds_started_total", kind="venv") == 2
    assert observed.sample("takeoff_builder_builds_finished_total", kind="venv", outcome="succeeded") == 2
    assert observed.sample("takeoff_builder_cache_lookups_total", kind="venv", result="miss") == 1
    assert observed.sample("takeoff_builder_cache_lookups_total", kind="venv", result="hit") == 1
    for cache in ("hit", "miss"):
        assert observed.sample("takeoff_builder_build_duration_seconds_count", kind="venv", cache=cache) == 1
    assert observed.sample("takeoff_builder_builds", kind="venv", state="RUNNING") == 0

    spans = observed.finished_spans()
    miss, hit = sorted(by_name(spans)["build"], key=lambda span: span.start_time or 0)
    assert children(spans, miss) == ["build.fetch_source", "build.install", "build.resolve"]
    assert children(spans, hit) == ["build.resolve"]
    for span, was_hit in ((miss, False), (hit, True)):
        assert span.attributes is not None
        assert span.attributes["takeoff.cache_hit"] is was_hit
        assert span.attributes["takeoff.project"] == project
        assert span.attributes["takeoff.job_version"] == version
        assert span.attributes["takeoff.build_key"] == first.result.build_key
        assert span.status.status_code is not StatusCode.ERROR


async def test_a_failing_build_is_counted_by_its_reason_and_its_span_is_an_error(
    observed: Observed, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, build_context="missing")  # fails before any venv is made
    outcome = await observed.builder.build(version)
    assert outcome.failure.reason == common_pb2.FAILURE_REASON_BUILD_FAILED

    assert observed.sample("takeoff_builder_builds_finished_total", kind="venv", outcome="build_failed") == 1
    assert observed.sample("takeoff_builder_builds_finished_total", kind="venv", outcome="succeeded") == 0
    [build] = by_name(observed.finished_spans())["build"]
    assert build.status.status_code is StatusCode.ERROR
