"""Dispatch latency, start-up time and memory with a small and a huge backlog waiting in the database.

For each backlog size: starts a local stack (SQLite), makes a queue that no agent serves and one PENDING
item in it through Enqueue, stops the stack, copies that item (its row and its history) straight into the
database until the queue holds ``N`` PENDING items, starts the stack again, and reports the queue
service's start-up (its process start to its ready file: the index rebuilt from the database) and its
resident memory, then bench/dispatch.py's measurement on another queue of the same service, then drains
``--drain`` items from the deep queue itself (synthetic agents as in bench/throughput.py: every item
RUNNING, then SUCCEEDED), which pages its line in from the database as it goes. Goal: the p50 with
1,000,000 waiting within 1.5x of the figure with 100.

    python bench/depth.py [--items 300] [--small 100] [--large 1000000] [--drain 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from dispatch import _agent_key, _create_queue, bench_stack, measure, print_table
from local_services import lift_enqueue_limit
from throughput import SyntheticAgent

from takeoff.stack import LocalStack
from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_aio_channel


async def _one_pending(queue_address: str, admin_key: str) -> tuple[str, str]:
    async with open_aio_channel(queue_address, api_key=admin_key) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        queue = await _create_queue(stub)
        reply = await stub.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job="bench"))
        return queue, reply.item.name.rsplit("/", 1)[1]


async def _drain(queue_address: str, registry_address: str, admin_key: str, queue: str, items: int) -> float:
    """Life cycles per second of ``items`` of the deep queue's own items, four agents of 64 slots."""
    async with open_aio_channel(queue_address, api_key=admin_key) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        key = await _agent_key(registry_address, admin_key, queue)
        agents = [SyntheticAgent(stub, queue, 64, key) for _ in range(4)]
        counter, finished = [0], asyncio.Event()
        started = time.perf_counter()
        streams = [asyncio.create_task(agent.run(counter, items, finished)) for agent in agents]
        waiting = asyncio.create_task(finished.wait())
        await asyncio.wait([waiting, *streams], return_when=asyncio.FIRST_COMPLETED)
        for task in streams:
            if task.done():
                task.result()  # a stream that failed: its error
        elapsed = time.perf_counter() - started
        for agent in agents:
            agent.stop()
        await asyncio.gather(*streams, return_exceptions=True)
    return items / elapsed


def _seed(database: Path, template: str, count: int) -> None:
    """``count - 1`` copies of item ``template`` (PENDING) and of its transitions, with fresh ids."""
    with sqlite3.connect(database) as db:
        item_columns = [
            row[1] for row in db.execute("PRAGMA table_info(queue_items)") if row[1] not in ("seq",)
        ]
        copied = ", ".join("printf('%020x', n.i)" if c == "id" else f"t.{c}" for c in item_columns)
        db.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            f"INSERT INTO queue_items ({', '.join(item_columns)}) "
            f"SELECT {copied} FROM n, queue_items t WHERE t.id = ?",
            (count - 1, template),
        )
        moves = [row[1] for row in db.execute("PRAGMA table_info(queue_transitions)") if row[1] != "id"]
        copied = ", ".join("i.id" if c == "item_id" else f"t.{c}" for c in moves)
        db.execute(
            f"INSERT INTO queue_transitions ({', '.join(moves)}) SELECT {copied} "
            "FROM queue_items i, queue_transitions t WHERE t.item_id = ? AND i.id != ? "
            "AND i.queue = (SELECT queue FROM queue_items WHERE id = ?)",
            (template, template, template),
        )


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(items: int, backlog: int, drain: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as home:
        with bench_stack(Path(home)) as (stack, record):
            deep, template = asyncio.run(_one_pending(record.services["queue"].address, stack.admin_key))
        seeding = time.perf_counter()
        _seed(Path(home) / "queue.db", template, backlog)
        seeded = time.perf_counter() - seeding
        stack = LocalStack(Path(home), base_port=0)
        started = time.perf_counter()
        record = stack.start(timeout=1800)
        start_seconds = time.perf_counter() - started
        try:
            queue = record.services["queue"]
            rss = _rss_mib(queue.pid)
            latencies = sorted(
                asyncio.run(
                    measure(queue.address, record.services["registry"].address, stack.admin_key, items, 0)
                )
            )
            rss_after = _rss_mib(queue.pid)
            registry = record.services["registry"].address
            drained = min(drain, backlog)
            rate = asyncio.run(_drain(queue.address, registry, stack.admin_key, deep, drained))
            rss_drained = _rss_mib(queue.pid)
        finally:
            stack.stop()
    return {
        "job": "bench",
        "items": items,
        "backlog": backlog,
        "seed_seconds": round(seeded, 1),
        "stack_start_seconds": round(start_seconds, 2),
        "queue_rss_mib": rss,
        "queue_rss_after_mib": rss_after,
        "drained": drained,
        "drain_life_cycles_per_second": round(rate, 1),
        "queue_rss_drained_mib": rss_drained,
        "p50_ms": round(latencies[len(latencies) // 2], 3),
        "p90_ms": round(latencies[int(len(latencies) * 0.9) - 1], 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "max_ms": round(latencies[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--drain", type=int, default=3000)
    args = parser.parse_args()
    lift_enqueue_limit()
    small, large = run(args.items, args.small, args.drain), run(args.items, args.large, args.drain)
    print_table([small, large])
    for row in (small, large):
        print(
            f"backlog {row['backlog']:>8}: stack start {row['stack_start_seconds']} s, "
            f"queue RSS {row['queue_rss_mib']} MiB (after {row['queue_rss_after_mib']} MiB); drained "
            f"{row['drained']} of the deep queue at {row['drain_life_cycles_per_second']}/s, RSS then "
            f"{row['queue_rss_drained_mib']} MiB"
        )
    ratio = large["p50_ms"] / small["p50_ms"]
    print(json.dumps({"p50_ratio_large_over_small": round(ratio, 3)}))
    print(f"p50 ratio ({args.large} vs {args.small} waiting): {ratio:.2f}")


if __name__ == "__main__":
    main()
