"""Dispatch latency: Enqueue sent -> Assignment received by an idle agent, over real processes.

Starts a local stack (registry, queue, builder) on free ports in a temporary TAKEOFF_HOME, creates a code
job and a queue, connects one agent (a Lease stream with room for every item), then enqueues items one at
a time and times each from the Enqueue call to its Assignment. With ``--backlog N``, N items first wait
in a second queue of the same project that no agent serves: the items table and the dispatcher's index
hold them, so any cost that grows with the backlog shows. With ``--runs N``, the whole measurement is
repeated on N fresh stacks, one row each: on a shared machine, compare medians of several runs. ``--job``
is the reference enqueued: ``bench`` (``latest``, which the queue asks the registry about at every Enqueue)
or ``bench:v0`` (a numbered version, which it keeps). Prints JSON and a table.

    python bench/dispatch.py [--items 1000] [--backlog 0] [--runs 1] [--job bench:v0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from local_services import lift_enqueue_limit

from takeoff._stack_file import StackRecord
from takeoff.client import Client
from takeoff.stack import LocalStack
from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_aio_channel

LeaseRequest = queue_pb2.LeaseRequest
HEARTBEAT_SECONDS = 5.0
"""Well inside the queue's default lease TTL (30 s)."""
_BACKGROUND: set[asyncio.Task[None]] = set()
"""The fake agent's tasks, held for the life of the process."""


async def _agent_stream(
    stub: queue_pb2_grpc.QueueServiceAsyncStub, queue: str, capacity: int, agent_key: str
) -> tuple[asyncio.Queue[LeaseRequest | None], asyncio.Queue[tuple[float, str]]]:
    outgoing: asyncio.Queue[LeaseRequest | None] = asyncio.Queue()
    arrivals: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    hello = LeaseRequest.Hello(
        agent_id=uuid.uuid4().hex,
        session_id=uuid.uuid4().hex,
        queues=[queue],
        resources=[common_pb2.RESOURCE_KIND_LOCAL_PROCESS],
        capacity=capacity,
    )
    await outgoing.put(LeaseRequest(hello=hello))

    async def requests() -> AsyncIterator[LeaseRequest]:
        while (request := await outgoing.get()) is not None:
            yield request

    async def read() -> None:
        # The agent presents an agent key of its own, as real agents do.
        lease = stub.Lease(requests(), metadata=(("authorization", f"Bearer {agent_key}"),))
        try:
            async for response in lease:
                if response.HasField("assignment"):
                    await arrivals.put((time.perf_counter(), response.assignment.item.name))
        finally:
            await arrivals.put((time.perf_counter(), ""))  # the stream ended: measure() fails, not waits

    async def heartbeat() -> None:
        # Renew the leases as an agent does, or a long run outlives the lease TTL and loses every item.
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await outgoing.put(LeaseRequest(heartbeat=LeaseRequest.Heartbeat()))

    loop = asyncio.get_running_loop()
    _BACKGROUND.update({loop.create_task(read()), loop.create_task(heartbeat())})
    return outgoing, arrivals


async def _fill_backlog(stub: queue_pb2_grpc.QueueServiceAsyncStub, queue: str, count: int) -> None:
    pending = list(range(count))

    async def worker() -> None:
        while pending:
            pending.pop()
            await stub.Enqueue(
                queue_pb2.EnqueueRequest(queue=queue, job="bench", priority=common_pb2.PRIORITY_LOW)
            )

    await asyncio.gather(*(worker() for _ in range(32)))


async def _agent_key(registry_address: str, admin_key: str, queue: str) -> str:
    async with open_aio_channel(registry_address, api_key=admin_key) as channel:
        created = await keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(key=keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=[queue]))
        )
    return created.secret


async def measure(
    queue_address: str, registry_address: str, admin_key: str, items: int, backlog: int, *, job: str = "bench"
) -> list[float]:
    """Every call presents the admin key (verified through the registry, cached) but the agent's stream."""
    async with open_aio_channel(queue_address, api_key=admin_key) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        await _fill_backlog(stub, await _create_queue(stub), backlog)
        queue = await _create_queue(stub)
        agent_key = await _agent_key(registry_address, admin_key, queue)
        _, arrivals = await _agent_stream(stub, queue, capacity=items + 10, agent_key=agent_key)
        latencies = []
        for _ in range(items):
            started = time.perf_counter()
            reply = await stub.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))
            while True:
                arrived, name = await arrivals.get()
                if not name:
                    raise RuntimeError("the agent's Lease stream ended")
                if name == reply.item.name:
                    break
            latencies.append((arrived - started) * 1e3)
        return latencies


@contextlib.contextmanager
def bench_stack(home: Path) -> Iterator[tuple[LocalStack, StackRecord]]:
    """A started local stack in ``home`` whose registry holds the code job ``bench``; stopped after."""
    stack = LocalStack(home, base_port=0)
    record = stack.start()
    try:
        code = home / "code"
        code.mkdir()
        (code / "job.py").write_text("print('hi')\n")
        with Client(record.services["registry"].address, project="bench", api_key=stack.admin_key) as client:
            client.create_job_version("bench", code, entrypoint=["python", "job.py"])
        yield stack, record
    finally:
        stack.stop()


def run(items: int, backlog: int, job: str = "bench") -> dict[str, Any]:
    """Start a stack, measure ``items`` dispatches with ``backlog`` items waiting elsewhere, stop it."""
    with (
        tempfile.TemporaryDirectory(prefix="takeoff-bench-") as home,
        bench_stack(Path(home)) as (stack, record),
    ):
        registry = record.services["registry"].address
        latencies = asyncio.run(
            measure(record.services["queue"].address, registry, stack.admin_key, items, backlog, job=job)
        )
    ordered = sorted(latencies)
    return {
        "job": job,
        "items": items,
        "backlog": backlog,
        "p50_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1], 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 3),
        "max_ms": round(ordered[-1], 3),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(json.dumps(results, indent=2))
    print(f"\n{'job':>9} {'items':>6} {'backlog':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for row in results:
        print(
            f"{row['job']:>9} {row['items']:>6} {row['backlog']:>8} {row['p50_ms']:>8} {row['p90_ms']:>8}"
            f" {row['p99_ms']:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument(
        "--job", default="bench", help="the reference enqueued: bench (latest, asked each time) or bench:v0"
    )
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    lift_enqueue_limit()
    print_table([run(args.items, args.backlog, args.job) for _ in range(args.runs)])


async def _create_queue(stub: queue_pb2_grpc.QueueServiceAsyncStub) -> str:
    response = await stub.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent="projects/bench",
            queue_id=f"q-{uuid.uuid4().hex[:8]}",
            queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
        )
    )
    return response.queue.name


if __name__ == "__main__":
    main()
