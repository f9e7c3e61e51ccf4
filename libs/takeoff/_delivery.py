"""Where a run's data goes: the registry (``takeoff._sender.RunSender``) or a local directory in offline
mode (``takeoff._offline``). :class:`takeoff.Run` talks to either through :class:`Delivery`."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from takeoff.v1 import runs_pb2

LoggedRow = tuple[int, int, Mapping[str, Any]]
"""One ``run.log`` call: step, time in ns since the epoch, values (checked by the SDK, not yet converted)."""


class Delivery(Protocol):
    """Takes a run's rows, summary and config changes and final state, and delivers them in the background."""

    rows: deque[LoggedRow]
    """``run.log`` appends here (atomic, no lock); a background thread drains it."""

    def update_summary(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the summary (a None value removes the key)."""

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the recorded config (a None value removes the key)."""

    def close(self, finish: runs_pb2.FinishRunRequest, timeout: float) -> None:
        """Deliver everything, then ``finish``; give up with a warning after ``timeout`` seconds."""
