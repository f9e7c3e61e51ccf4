"""How long a real registry takes to send a long metric history downsampled for a chart (ReadMetrics
``max_points``), beside sending it whole.

Starts ``python -m takeoff_registry`` on a free loopback port with a temporary TAKEOFF_HOME (SQLite, or
``--database-url``), logs ``--rows`` rows of three numeric keys in batches of ``--batch`` (as the SDK's
sender does), then times ReadMetrics ``--repeats`` times each, from the call to its last message:
downsampled to ``--max-points`` for one key (one chart) and for every key, and the whole history for one
key. Goal: 100,000 rows to about 1,000 points in at most 300 ms (the console's run chart). Prints JSON and
a table.

    python bench/metrics_downsample.py [--rows 100000] [--batch 1000] [--max-points 1000] [--repeats 20]
        [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from local_services import new_admin_key, registry_process

from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_aio_channel

GOAL_MS = 300


async def log_history(runs: runs_pb2_grpc.RunServiceAsyncStub, rows: int, batch: int) -> str:
    created = await runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/bench"))
    name = created.run.name
    for start in range(0, rows, batch):
        await runs.BatchLogMetrics(
            runs_pb2.BatchLogMetricsRequest(
                name=name,
                first_row_index=start,
                rows=[
                    runs_pb2.MetricRow(
                        step=step,
                        values={"loss": 1 / (step + 1), "accuracy": (step % 97) / 97, "epoch": step // 1000},
                    )
                    for step in range(start, min(start + batch, rows))
                ],
            )
        )
    return name


async def read_times_ms(
    runs: runs_pb2_grpc.RunServiceAsyncStub, request: runs_pb2.ReadMetricsRequest, repeats: int
) -> tuple[list[float], int]:
    """Each read's milliseconds from the call to its last message, and how many rows one read sends."""
    times, sent = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        sent = 0
        async for message in runs.ReadMetrics(request):
            sent += len(message.rows)
        times.append((time.perf_counter() - started) * 1000)
    return times, sent


async def measure(
    address: str, key: str, *, rows: int, batch: int, max_points: int, repeats: int
) -> dict[str, dict[str, float]]:
    async with open_aio_channel(address, api_key=key) as channel:
        runs = runs_pb2_grpc.RunServiceStub(channel)
        name = await log_history(runs, rows, batch)
        reads = {
            "downsampled_one_key": runs_pb2.ReadMetricsRequest(
                name=name, keys=["loss"], max_points=max_points
            ),
            "downsampled_every_key": runs_pb2.ReadMetricsRequest(name=name, max_points=max_points),
            "whole_one_key": runs_pb2.ReadMetricsRequest(name=name, keys=["loss"]),
        }
        results = {}
        for label, request in reads.items():
            await read_times_ms(runs, request, 1)  # warm-up
            times, sent = await read_times_ms(runs, request, repeats)
            times.sort()
            results[label] = {
                "rows_sent": sent,
                "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="rows per BatchLogMetrics call")
    parser.add_argument("--max-points", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--database-url", help="PostgreSQL URL; default: SQLite under a temporary home")
    args = parser.parse_args()
    key = new_admin_key()
    with registry_process(database_url=args.database_url, admin_key=key) as registry:
        results = asyncio.run(
            measure(
                registry.address,
                key,
                rows=args.rows,
                batch=args.batch,
                max_points=args.max_points,
                repeats=args.repeats,
            )
        )
    print(
        json.dumps(
            {"rows": args.rows, "batch": args.batch, "max_points": args.max_points, **results}, indent=2
        )
    )
    title = f"ReadMetrics of {args.rows:,} rows"
    print(f"\n{title:<28}{'rows sent':>10}{'p50 ms':>9}{'p95 ms':>9}")
    for label, result in results.items():
        print(f"{label:<28}{result['rows_sent']:>10,}{result['p50_ms']:>9.1f}{result['p95_ms']:>9.1f}")
    print(f"goal: downsampled p50 <= {GOAL_MS} ms")


if __name__ == "__main__":
    main()
