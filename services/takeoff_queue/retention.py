"""What the queue forgets (docs/design.md §9, "Retention"): ended items with their history, by age and by
count, and request-id records by age. Items not ended (PENDING, under a lease, or waiting for their run's
close) are never touched, however old: the store chooses by state first. The passes are run by
``takeoff_server.retention.pruning`` (at start, every ``interval_seconds``, and on SIGUSR1)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from pydantic import Field

from takeoff_queue.store import QueueStore, QueueWrite
from takeoff_server.retention import RetentionSettings

BATCH = 1000
"""Ended items deleted per transaction: a large backlog is pruned without one long write holding up the
group commits of dispatch."""


class QueueRetentionSettings(RetentionSettings):
    ended_item_days: float = Field(default=30.0, ge=1)
    """Items that ended (SUCCEEDED, FAILED, CANCELLED) longer ago than this are deleted with their history;
    GetItem and RelaunchItem then answer NOT_FOUND for them. Runs, logs and metrics stay in the registry."""
    max_ended_items: int = Field(default=0, ge=0)
    """At most this many ended items are kept, those that ended last; 0 = no limit by count."""


class QueueRetention:
    def __init__(
        self, settings: QueueRetentionSettings, store: QueueStore, clock: Callable[[], datetime]
    ) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock

    async def prune(self) -> dict[str, int]:
        """One pass; returns what it deleted."""
        now = self._clock()
        ended_before = now - timedelta(days=self._settings.ended_item_days)
        keep = self._settings.max_ended_items
        deleted = 0
        while True:

            async def delete(tx: QueueWrite) -> int:
                return await tx.delete_ended_items(ended_before, keep, BATCH)

            batch = await self._store.write(delete)
            deleted += batch
            if batch < BATCH:
                break

        async def forget(tx: QueueWrite) -> int:
            return await tx.forget_request_ids(self._settings.request_ids_before(now))

        return {"ended_items": deleted, "request_ids": await self._store.write(forget)}
