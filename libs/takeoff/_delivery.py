"""Where a run's data goes: the registry (``takeoff._sender.RunSender``), a local directory in offline
mode (``takeoff._offline``), or nowhere (:class:`DisabledDelivery`). :class:`takeoff.Run` talks to each
through :class:`Delivery`.

Metric summaries (the last value of each metric, or its min, max or mean after ``run.define_metric``) are
computed by a delivery's background thread from the rows it drains (:class:`MetricSummaries`), so that
``run.log`` pays nothing for them.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from takeoff.v1 import runs_pb2

LoggedRow = tuple[int, int, dict[str, Any]]
"""One ``run.log`` row: step, time in ns since the epoch, values (checked by the SDK, plain JSON values)."""


def warn(message: str) -> None:
    """Tell the job's user something on stderr, marked as Takeoff's."""
    print(f"takeoff: {message}", file=sys.stderr, flush=True)


SUMMARY_KINDS = frozenset({"min", "max", "mean", "last", "none"})
_DEFAULT_KINDS = frozenset({"default"})  # the plain last value, not {"last": ...}
_NO_SUMMARY = frozenset({"none"})
_SYSTEM_PREFIX = "system/"


class Delivery(Protocol):
    """Takes a run's rows, summary and config changes and final state, and delivers them in the background."""

    rows: deque[LoggedRow]
    """``run.log`` appends here (atomic, no lock); a background thread drains it."""

    def update_summary(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the summary (a None value removes the key); the keys are the code's own
        from now on, never overwritten by metric summaries."""

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the recorded config (a None value removes the key)."""

    def define_metric(self, name: str, summary: str | None, step_metric: str | None) -> None:
        """Summarise metric ``name`` (ending in ``*``: every metric it prefixes) as ``summary`` (None: its
        last value); a row holding it but not ``step_metric`` gets the step metric's last value."""

    def close(self, finish: runs_pb2.FinishRunRequest, timeout: float) -> None:
        """Deliver everything, then ``finish``; give up with a warning after ``timeout`` seconds."""


class DisabledDelivery:
    """The delivery of ``mode="disabled"``: every row and change is dropped where it is made."""

    def __init__(self) -> None:
        self.rows: deque[LoggedRow] = deque(maxlen=0)  # appending to a deque of no length keeps nothing

    def update_summary(self, changes: Mapping[str, Any]) -> None:
        pass

    def update_config(self, changes: Mapping[str, Any]) -> None:
        pass

    def define_metric(self, name: str, summary: str | None, step_metric: str | None) -> None:
        pass

    def close(self, finish: runs_pb2.FinishRunRequest, timeout: float) -> None:
        pass


class _Metric:
    """What is known of one metric: its rule and the values that make its summary."""

    __slots__ = ("count", "kinds", "last", "maximum", "minimum", "step_metric", "total")

    def __init__(self, kinds: frozenset[str], step_metric: str | None) -> None:
        self.kinds = kinds
        self.step_metric = step_metric
        self.count = 0
        self.total = 0.0
        self.minimum: float | None = None
        self.maximum: float | None = None
        self.last: Any = None

    def summary(self) -> Any:
        """The summary value: the last value by default, else ``{"min": ..., "max": ...}`` as defined."""
        if self.kinds == _DEFAULT_KINDS:
            return self.last
        values = {"min": self.minimum, "max": self.maximum, "last": self.last}
        if self.count:
            values["mean"] = self.total / self.count
        summary = {kind: values[kind] for kind in sorted(self.kinds) if values.get(kind) is not None}
        return summary or None  # a None value removes the key: a metric summarised as "none" has none


class MetricSummaries:
    """The summary a run's rows make, as wandb's: each metric's last value, unless ``define_metric`` says
    ``min``, ``max``, ``mean``, ``last`` (several joined by commas) or ``none``; keys the code set in
    ``run.summary`` are left to it. Numbers, strings and booleans are summarised; lists and dicts are not
    (a histogram per metric would soon pass the summary's 256 KiB), nor are ``system/*`` metrics unless
    defined.

    ``observe`` runs on the delivery's thread; ``define`` and ``set_explicitly`` on the training thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._definitions: dict[str, tuple[frozenset[str], str | None]] = {}
        self._metrics: dict[str, _Metric] = {}
        self._explicit: set[str] = set()
        self._changed: set[str] = set()

    def define(self, name: str, summary: str | None, step_metric: str | None) -> None:
        kinds = parse_summary(summary) if summary else _DEFAULT_KINDS
        with self._lock:
            self._definitions[name] = (kinds, step_metric)
            for key in [key for key in self._metrics if _matches(name, key)]:
                del self._metrics[key]  # rebuilt under the new rule from the next row on
                self._changed.add(key)

    def set_explicitly(self, keys: Mapping[str, Any]) -> None:
        with self._lock:
            self._explicit.update(keys)

    def observe(self, values: dict[str, Any]) -> None:
        """Take one row into account; a row holding a metric whose step metric it lacks gets that metric's
        last value added (wandb's step sync)."""
        with self._lock:
            for key, value in list(values.items()):
                metric = self._metrics.get(key) or self._track(key)
                if metric.step_metric and metric.step_metric not in values:
                    step_metric = self._metrics.get(metric.step_metric)
                    if step_metric is not None and step_metric.last is not None:
                        values[metric.step_metric] = step_metric.last
                kind = type(value)
                if kind is bool or kind is str:
                    metric.last = value
                elif kind is int or kind is float:
                    number = float(value)  # first: an int too large for a double fails before any change
                    metric.last = value
                    metric.count += 1
                    metric.total += number
                    metric.minimum = value if metric.minimum is None else min(metric.minimum, value)
                    metric.maximum = value if metric.maximum is None else max(metric.maximum, value)
                else:
                    continue
                if metric.kinds != _NO_SUMMARY:
                    self._changed.add(key)

    def take_changes(self) -> dict[str, Any]:
        """The summary values changed since the last call, keys the code set left out."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return {
                key: metric.summary() if (metric := self._metrics.get(key)) else None
                for key in changed - self._explicit
            }

    def _track(self, key: str) -> _Metric:
        rule = self._definitions.get(key)
        if rule is None:
            globs = [name for name in self._definitions if name.endswith("*") and _matches(name, key)]
            if globs:
                rule = self._definitions[max(globs, key=len)]
            else:  # system metrics have their own charts, as in wandb, and would crowd the summary
                rule = (_NO_SUMMARY if key.startswith(_SYSTEM_PREFIX) else _DEFAULT_KINDS, None)
        metric = self._metrics[key] = _Metric(*rule)
        return metric


def parse_summary(summary: str) -> frozenset[str]:
    """``"min,max"`` as ``{"min", "max"}``; ValueError naming the choices for anything else."""
    kinds = frozenset(part.strip() for part in summary.split(","))
    if not kinds <= SUMMARY_KINDS or ("none" in kinds and len(kinds) > 1):
        choices = ", ".join(sorted(SUMMARY_KINDS))
        raise ValueError(f"summary must be one of {choices} (or several joined by commas), not {summary!r}")
    return kinds


def _matches(name: str, key: str) -> bool:
    return key.startswith(name[:-1]) if name.endswith("*") else key == name
