"""The builder's own Prometheus metrics (docs/design.md §9, "Metrics"): builds started and finished, cache
lookups, build durations, builds under way, and what retention removed."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.registry import Collector

from takeoff_builder.model import Build, BuildKind, BuildState
from takeoff_server.metrics import DURATION_BUCKETS, CallbackGauge, counter, histogram


class BuilderMetrics:
    def __init__(self) -> None:
        self.started = counter(
            "takeoff_builder_builds_started_total",
            "Builds started (a call joining one under way starts none), by kind.",
            ["kind"],
        )
        self.finished = counter(
            "takeoff_builder_builds_finished_total",
            "Builds ended, by kind and outcome: succeeded, build_failed (the job's inputs) or build_infra.",
            ["kind", "outcome"],
        )
        self.cache = counter(
            "takeoff_builder_cache_lookups_total",
            "Cache lookups of venv and image builds, by kind and result (hit or miss).",
            ["kind", "result"],
        )
        self.duration = histogram(
            "takeoff_builder_build_duration_seconds",
            "A build's time from start to end (a wait for a slot included), by kind and cache result.",
            ["kind", "cache"],
            buckets=DURATION_BUCKETS,
        )
        self.pruned = counter(
            "takeoff_builder_pruned_total",
            "What retention removed: builds (records and logs), venvs, code, images, request_ids.",
            ["what"],
        )
        self.pruned_bytes = counter(
            "takeoff_builder_pruned_bytes_total", "Bytes of disk retention freed, by what.", ["what"]
        )
        self._under_way: Callable[[], Iterable[Build]] = tuple

    def watch(self, under_way: Callable[[], Iterable[Build]]) -> None:
        """Report the builds ``under_way`` returns (read when scraped) as ``takeoff_builder_builds``."""
        self._under_way = under_way

    def _states(self) -> Mapping[tuple[str, ...], float]:
        tally = Tally((build.kind.value, build.state.value) for build in self._under_way())
        return {
            (kind.value, state.value): float(tally[(kind.value, state.value)])
            for kind in BuildKind
            for state in (BuildState.QUEUED, BuildState.RUNNING)
        }

    @property
    def collectors(self) -> tuple[Collector, ...]:
        under_way = CallbackGauge(
            "takeoff_builder_builds", "Builds under way, by kind and state.", self._states, ["kind", "state"]
        )
        return (
            self.started,
            self.finished,
            self.cache,
            self.duration,
            self.pruned,
            self.pruned_bytes,
            under_way,
        )

    def build_finished(self, build: Build) -> None:
        outcome = "succeeded" if build.failure is None else build.failure.reason.value.lower()
        self.finished.labels(build.kind.value, outcome).inc()
        if build.end_time is not None:
            cache = "hit" if build.cache_hit else "miss"
            seconds = (build.end_time - build.create_time).total_seconds()
            self.duration.labels(build.kind.value, cache).observe(max(seconds, 0.0))
