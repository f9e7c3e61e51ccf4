"""Calls their callers cancel part-way: a write is done whole or not at all, and never holds the database
from the writes after it (docs/design.md §9 "Databases")."""

from __future__ import annotations

import asyncio
import random

from takeoff.v1 import keys_pb2
from tests.registry.conftest import Registry

ITEM = "projects/p/queues/q/items/i"
JOB_VERSION = "projects/p/jobs/j/versions/0"
CALLS = 400
STORM_DEADLINE = 1.0
"""The storm's calls: a deadline ends those a kept lock stalls, so the test fails (not hangs) without the
fix."""


async def test_writes_cancelled_at_any_point_leave_the_database_free_for_the_next(registry: Registry) -> None:
    rng = random.Random(7)

    async def mint(index: int, deadline: float) -> None:
        run = f"projects/p/runs/r{index}-1"
        await registry.keys.MintRunToken(
            keys_pb2.MintRunTokenRequest(run=run, item=ITEM, job_version=JOB_VERSION), timeout=deadline
        )

    for start in range(0, CALLS, 20):
        calls = [asyncio.ensure_future(mint(index, STORM_DEADLINE)) for index in range(start, start + 20)]
        for _ in range(3):  # cancelled at different points of their work, some more than once
            await asyncio.sleep(rng.random() * 0.01)
            for call in calls:
                if rng.random() < 0.3:
                    call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    for index in range(CALLS, CALLS + 5):  # each waits for a write lock a cancelled call may have kept
        await mint(index, 30)
