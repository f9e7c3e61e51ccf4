"""The queue service's own Prometheus metrics (docs/design.md §9), beside the RPC metrics every server has.

Counters and the dispatch histogram are changed where the dispatcher acts, through per-queue children
looked up once (a dictionary read and an increment per event, nothing allocated); depths and leases held
are read from the dispatcher's in-memory index when scraped (``CallbackGauge``), so nothing is kept in
step with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client.registry import Collector

from takeoff_server.metrics import CallbackGauge, counter, histogram


class Index(Protocol):
    """What the gauges read when scraped: the dispatcher's counts of its index."""

    def depths(self) -> tuple[Mapping[str, int], Mapping[str, int]]: ...

    def leases_by_queue(self) -> Mapping[str, int]: ...


class _PerQueue:
    """A labelled metric's child for each queue, made on the queue's first event."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[str, Any] = {}

    def __getitem__(self, queue: str) -> Any:
        child = self._children.get(queue)
        if child is None:
            child = self._children[queue] = self._metric.labels(queue)
        return child


class QueueMetrics:
    def __init__(self) -> None:
        self._dispatch = histogram(
            "takeoff_queue_dispatch_seconds",
            "From an item becoming eligible (its Enqueue, or the end of its retry wait) to its Assignment.",
            ["queue"],
        )
        self._assignments = counter(
            "takeoff_queue_assignments_total", "Assignments sent to agents.", ["queue"]
        )
        self._enqueues = counter(
            "takeoff_queue_enqueues_total", "Items committed by Enqueue or RelaunchItem.", ["queue"]
        )
        self._expired = counter(
            "takeoff_queue_leases_expired_total",
            "Leases ended because their agent stopped renewing them.",
            ["queue"],
        )
        self._claims_refused = counter(
            "takeoff_queue_claims_refused_total",
            "Claims another queue replica won first, or that a queue's concurrency limit refused (replicas).",
            ["queue"],
        )
        self.dispatch = _PerQueue(self._dispatch)
        self.claims_refused = _PerQueue(self._claims_refused)
        self.assignments = _PerQueue(self._assignments)
        self.enqueues = _PerQueue(self._enqueues)
        self.expired = _PerQueue(self._expired)

    def collectors(self, index: Callable[[], Index]) -> list[Collector]:
        """Every metric, the gauges reading ``index()`` (the dispatcher) when scraped."""

        def depth(which: int) -> dict[tuple[str, ...], float]:
            return {(queue,): count for queue, count in index().depths()[which].items()}

        return [
            self._dispatch,
            self._assignments,
            self._enqueues,
            self._expired,
            self._claims_refused,
            CallbackGauge("takeoff_queue_depth", "Items PENDING per queue.", lambda: depth(0), ["queue"]),
            CallbackGauge(
                "takeoff_queue_running",
                "Items held under a lease (LEASED, BUILDING, STARTING, RUNNING) per queue.",
                lambda: depth(1),
                ["queue"],
            ),
            CallbackGauge(
                "takeoff_queue_leases_held",
                "Leases held by agents now, per queue.",
                lambda: {(queue,): count for queue, count in index().leases_by_queue().items()},
                ["queue"],
            ),
        ]
