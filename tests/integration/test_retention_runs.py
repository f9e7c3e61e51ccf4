"""How retention passes run (libs/takeoff_server/retention.py): one at start, one at once on SIGUSR1, never
two at a time, and a failing pass does not stop the next."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from takeoff_server.retention import PRUNE_SIGNAL, RetentionSettings, pruning
from tests.processes import until


def seen(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``condition`` as the awaitable probe ``until`` takes."""

    async def probe() -> bool:
        return condition()

    return probe


async def test_a_pass_runs_at_start_and_on_sigusr1_and_a_failed_pass_does_not_stop_the_next() -> None:
    passes: list[str] = []

    async def prune() -> str:
        passes.append("pass")
        if len(passes) == 2:
            raise OSError("the disk went away")
        return "removed nothing"

    settings = RetentionSettings(interval_seconds=0)  # no schedule: at start and on demand only
    async with pruning("test", prune, settings) as pruner:
        await until(seen(lambda: len(passes) == 1), "the pass at start", within=10)
        os.kill(os.getpid(), PRUNE_SIGNAL)
        await until(seen(lambda: len(passes) == 2), "the pass on SIGUSR1 (it fails)", within=10)
        os.kill(os.getpid(), PRUNE_SIGNAL)
        await until(seen(lambda: pruner.passes == 2), "the next pass, after the failed one", within=10)
        assert await pruner.prune_now() == "removed nothing"
    assert len(passes) == 4


async def test_passes_never_overlap() -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def prune() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    async with pruning("test", prune, RetentionSettings(interval_seconds=0)) as pruner:
        on_demand = [asyncio.create_task(pruner.prune_now()) for _ in range(3)]
        await until(seen(lambda: running == 1), "a pass under way", within=10)
        release.set()
        await asyncio.gather(*on_demand)
    assert most == 1
    assert pruner.passes == 4
