"""Pruning what a service no longer needs, periodically and on demand (docs/design.md §9, "Retention").

A service states what to prune and what is in use in its own ``retention.py``; this module holds the
settings every service shares and the loop that runs the passes: one at start, then every
``interval_seconds``, and one at once on ``SIGUSR1`` (``kill -USR1 PID``). Passes never overlap, and a pass
that fails is logged and the next runs on schedule: pruning is housekeeping, never a reason to stop serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlmodel.ext.asyncio.session import AsyncSession

logger = logging.getLogger(__name__)

PRUNE_SIGNAL = signal.SIGUSR1


class RetentionSettings(BaseModel):
    """``retention:`` in a service's settings (``TAKEOFF_RETENTION__*``)."""

    model_config = {"extra": "forbid"}

    interval_seconds: float = Field(default=3600.0, ge=0)
    """Time between pruning passes; 0 = only at start and on ``SIGUSR1``."""
    in_use_hours: float = Field(default=24.0, gt=0)
    """What was handed out (a venv, an image, an uploaded artifact) this recently counts as in use: a job
    may be running from it, or a caller may be about to reference it. Never pruned, by age or by size."""
    request_id_days: float = Field(default=7.0, ge=1)
    """Request-id records older than this are forgotten (the API promises at least a day of replay)."""

    def in_use_since(self, now: datetime) -> datetime:
        return now - timedelta(hours=self.in_use_hours)

    def request_ids_before(self, now: datetime) -> datetime:
        return now - timedelta(days=self.request_id_days)


class Pruner:
    """Runs one pruning pass at a time; :meth:`prune_now` is the on-demand pass."""

    def __init__(self, name: str, prune: Callable[[], Awaitable[object]]) -> None:
        self._name = name
        self._prune = prune
        self._lock = asyncio.Lock()
        self.passes = 0

    async def prune_now(self) -> object:
        async with self._lock:
            report = await self._prune()
            self.passes += 1
            logger.info("%s retention: %s", self._name, report)
            return report

    async def _guarded(self) -> None:
        try:
            await self.prune_now()
        except Exception:
            logger.exception("%s retention: the pass failed; the next runs on schedule", self._name)

    async def _loop(self, interval: float, wakeup: asyncio.Event) -> None:
        while True:
            await self._guarded()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), interval or None)
            wakeup.clear()


@asynccontextmanager
async def pruning(
    name: str, prune: Callable[[], Awaitable[object]], settings: RetentionSettings
) -> AsyncIterator[Pruner]:
    """Prune in the background while the block runs (enter it on the service's exit stack)."""
    pruner = Pruner(name, prune)
    wakeup = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(PRUNE_SIGNAL, wakeup.set)
    task = asyncio.create_task(pruner._loop(settings.interval_seconds, wakeup), name=f"{name} retention")
    try:
        yield pruner
    finally:
        loop.remove_signal_handler(PRUNE_SIGNAL)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def forget_request_ids(session: AsyncSession, table: sa.Table, before: datetime) -> int:
    """Delete the request-id records (``idempotency.request_ids_table``) made before ``before``."""
    result = await session.exec(sa.delete(table).where(table.c.create_time < before))
    return int(result.rowcount)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed; what vanishes meanwhile counts as 0)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
