"""ReadMetrics ``max_points``: a long history downsampled to each bucket's extremes, on a real registry.

Each test checks the rows sent against the rule written out plainly (:func:`expected_indices`) over the
values the test logged.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import sqlalchemy as sa

from takeoff.v1 import runs_pb2
from takeoff_server.protovalues import dict_to_struct
from tests.registry.conftest import Registry, failure
from tests.registry.test_runs import create_run, finish, follow, log_metrics, read_metrics

Values = dict[str, float]


def expected_indices(
    history: list[Values], *, start: int, max_points: int, keys: frozenset[str]
) -> list[int]:
    """The rule of runs.proto: ``max_points // 2`` buckets of consecutive indices, each bucket's row of
    the minimum and of the maximum per key (the first such row on a tie), and the first and last row."""
    rows, buckets = len(history) - start, max_points // 2
    held = [index for index in range(start, len(history)) if not keys or keys.intersection(history[index])]
    chosen = {held[0], held[-1]}
    sampled_keys = keys or {key for values in history for key in values}
    for key in sampled_keys:
        by_bucket: dict[int, list[int]] = {}
        for index in range(start, len(history)):
            value = history[index].get(key)
            if value is not None and not math.isnan(value):
                by_bucket.setdefault((index - start) * buckets // rows, []).append(index)
        for indices in by_bucket.values():
            chosen.add(min(indices, key=lambda index: history[index][key]))
            chosen.add(max(indices, key=lambda index: history[index][key]))
    return sorted(chosen)


async def log_history(registry: Registry, name: str, history: list[Values], *, batch: int = 777) -> None:
    """Log ``history`` in batches that straddle buckets, one batch sent twice to overlap the one before."""
    for first in range(0, len(history), batch):
        await log_metrics(registry, name, rows_of(history, first, first + batch), first=first)
    overlap = max(0, len(history) - batch - batch // 2)
    retried = await log_metrics(registry, name, rows_of(history, overlap, len(history)), first=overlap)
    assert retried.accepted_rows == 0


def rows_of(history: list[Values], first: int, end: int) -> list[runs_pb2.MetricRow]:
    return [
        runs_pb2.MetricRow(step=index, values=history[index])
        for index in range(first, min(end, len(history)))
    ]


def noisy_history(rows: int, *, seed: int = 7) -> list[Values]:
    """A falling loss with noise (repeated values among it, for ties), a spike in the middle, and an
    accuracy logged every tenth row."""
    chooser = random.Random(seed)
    history: list[Values] = []
    for index in range(rows):
        values = {"loss": round(1 / (index + 1) + chooser.random() / 20, 2)}
        if index % 10 == 0:
            values["accuracy"] = round(chooser.random(), 3)
        history.append(values)
    history[rows // 2]["loss"] = 1000.0
    return history


async def test_a_long_history_keeps_each_buckets_extremes_and_its_ends(registry: Registry) -> None:
    run = await create_run(registry)
    history = noisy_history(10_000)
    await log_history(registry, run.name, history)

    sampled = await read_metrics(registry, run.name, max_points=100)

    indices = [row.index for row in sampled]
    assert indices == expected_indices(history, start=0, max_points=100, keys=frozenset())
    assert {0, 5000, 9999} <= set(indices)  # the ends and the spike
    assert len(indices) < 2 * 100 + 2  # two keys, at most two rows per bucket each, and the ends
    assert all(dict(row.values) == history[row.index] and row.step == row.index for row in sampled)


async def test_requested_keys_are_sampled_and_sent_alone(registry: Registry) -> None:
    run = await create_run(registry)
    history = noisy_history(3000)
    await log_history(registry, run.name, history, batch=1000)
    keys = frozenset({"accuracy"})

    sampled = await read_metrics(registry, run.name, max_points=20, keys=sorted(keys), start_index=15)

    assert [row.index for row in sampled] == expected_indices(history, start=15, max_points=20, keys=keys)
    assert sampled[0].index == 20  # the first row from start_index holding accuracy
    assert all(dict(row.values) == {"accuracy": history[row.index]["accuracy"]} for row in sampled)


async def test_nan_is_never_an_extreme_and_non_numbers_come_whole(registry: Registry) -> None:
    run = await create_run(registry)
    history: list[Values] = [{"loss": math.nan if index % 3 else float(index % 7)} for index in range(400)]
    rows = rows_of(history, 0, len(history))
    rows[200].data.CopyFrom(dict_to_struct({"note": "halfway"}))
    await log_metrics(registry, run.name, rows)

    sampled = await read_metrics(registry, run.name, max_points=8)

    assert [row.index for row in sampled] == expected_indices(
        history, start=0, max_points=8, keys=frozenset()
    )
    assert all(not math.isnan(row.values["loss"]) for row in sampled[1:-1])
    notes = await read_metrics(registry, run.name, max_points=8, keys=["note"])
    assert [(row.index, row.data.fields["note"].string_value) for row in notes] == [(200, "halfway")]


async def test_a_history_no_longer_than_max_points_is_sent_whole(registry: Registry) -> None:
    run = await create_run(registry)
    history = noisy_history(50)
    await log_history(registry, run.name, history, batch=20)

    assert [row.index for row in await read_metrics(registry, run.name, max_points=50)] == list(range(50))
    assert [row.index for row in await read_metrics(registry, run.name, max_points=4, start_index=46)] == [
        46,
        47,
        48,
        49,
    ]


async def test_chunks_stored_without_columns_are_sampled_alike(registry: Registry) -> None:
    run = await create_run(registry)
    history = noisy_history(2000)
    await log_history(registry, run.name, history)
    with_columns = await read_metrics(registry, run.name, max_points=40)
    async with registry.database.engine.begin() as connection:
        await connection.execute(sa.text("UPDATE registry_metric_chunks SET value_columns = NULL"))

    without = await read_metrics(registry, run.name, max_points=40)

    assert without == with_columns
    assert [row.index for row in without] == expected_indices(
        history, start=0, max_points=40, keys=frozenset()
    )


async def test_following_sends_the_sampled_history_then_every_new_row(registry: Registry) -> None:
    run = await create_run(registry)
    history = noisy_history(1000)
    await log_history(registry, run.name, history, batch=500)
    received: list[runs_pb2.MetricRow] = []
    arrived = asyncio.Event()
    request = runs_pb2.ReadMetricsRequest(name=run.name, max_points=10, follow=True)
    follower = asyncio.create_task(follow(registry.runs.ReadMetrics(request), received, arrived))
    await asyncio.wait_for(arrived.wait(), timeout=10)
    sampled = expected_indices(history, start=0, max_points=10, keys=frozenset())
    while len(received) < len(sampled):
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), timeout=10)

    more = [{"loss": float(index)} for index in range(1000, 1030)]
    await log_metrics(registry, run.name, rows_of(history + more, 1000, 1030))
    await finish(registry, run.name)
    await asyncio.wait_for(follower, timeout=10)

    assert [row.index for row in received] == [*sampled, *range(1000, 1030)]


@pytest.mark.parametrize("max_points", [-1, 1, 3, 100_001])
async def test_max_points_out_of_bounds_is_refused(registry: Registry, max_points: int) -> None:
    run = await create_run(registry)
    await log_metrics(registry, run.name, rows_of(noisy_history(5), 0, 5))

    refused = await failure(read_metrics(registry, run.name, max_points=max_points))

    assert (refused.code, refused.reason, refused.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ARGUMENT_INVALID",
        ["max_points"],
    )


@pytest.mark.parametrize("max_points", [4, 100_000])
async def test_max_points_at_its_bounds_is_taken(registry: Registry, max_points: int) -> None:
    run = await create_run(registry)
    await log_metrics(registry, run.name, rows_of(noisy_history(5), 0, 5))

    assert len(await read_metrics(registry, run.name, max_points=max_points)) <= 5
