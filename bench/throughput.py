"""Life cycles per second through one queue service: concurrent enqueuers and synthetic agents.

Starts a local stack (registry, queue, builder) on free ports in a temporary TAKEOFF_HOME, on SQLite or on
a fresh PostgreSQL schema (``--database postgresql``, from ``TAKEOFF_TEST_POSTGRES_URL``), creates a code
job and a queue, and connects ``--agents`` synthetic agents speaking the Lease protocol (no processes run:
each Assignment is answered Progress RUNNING, and its Ack by Complete SUCCEEDED). ``--enqueuers`` tasks
then Enqueue ``--items`` items by the job's name, so every Enqueue resolves the job (``--job bench:v0``: by
its number, which the queue keeps once resolved). A life cycle counts
once its Complete is acknowledged: Enqueue, Assignment, RUNNING and SUCCEEDED, each committed before it
was answered. Every call presents a key (the admin key for Enqueue, an agent key per stream), as in
production: keys are always on, verified through the registry. The bench client shares the machine's cores
with the services.

Queue replicas (docs/design.md §5, PostgreSQL only): ``--replicas N`` runs N queue processes with
``TAKEOFF_REPLICAS=true`` on the one database (the stack's queue and N - 1 more); the agents and the
enqueuers are spread over them round-robin, and the queue's CPU is the sum over the replicas. ``--replicas
0`` (the default) is one queue process in the single-process model.

What limits it: the CPU seconds each process (the queue, the registry, this client; on PostgreSQL the
server's processes too, every session's, so an upper bound when others share it) spent per life cycle, read
from /proc; the registry's calls per life cycle by method, from its metrics; and with ``--profile FILE`` the
queue service's own cProfile (top functions by own time; the profiler slows it, so that run's rate is not
the figure).

    python bench/throughput.py [--items 5000] [--agents 8] [--capacity 64] [--enqueuers 64]
        [--database sqlite|postgresql] [--replicas 0|1|2] [--sqlite-sync NORMAL|FULL] [--job bench:v0]
        [--profile queue.prof] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import pstats
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
from dispatch import _agent_key, _create_queue, bench_stack
from local_services import lift_enqueue_limit
from prometheus_client.parser import text_string_to_metric_families

from takeoff._auth import keys_dir
from takeoff._stack_file import RunningService, StackRecord
from takeoff.stack import KEY_VARIABLES
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.main import PAGE_TOKEN_KEY_FILE

LeaseRequest = queue_pb2.LeaseRequest
RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
HEARTBEAT_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable
"""The interpreter of the replicas this bench adds (not the profiling wrapper: only the first is profiled)."""


class SyntheticAgent:
    """One Lease stream that runs every item it is given at once: RUNNING, then SUCCEEDED."""

    def __init__(self, stub: queue_pb2_grpc.QueueServiceAsyncStub, queue: str, capacity: int, key: str):
        self._stub = stub
        self._key = key
        self._outgoing: asyncio.Queue[LeaseRequest | None] = asyncio.Queue()
        self._epochs: dict[str, int] = {}
        self.completed = 0
        self.done = asyncio.Event()
        self.target = 0
        hello = LeaseRequest.Hello(
            agent_id=uuid.uuid4().hex,
            session_id=uuid.uuid4().hex,
            queues=[queue],
            resources=[common_pb2.RESOURCE_KIND_LOCAL_PROCESS],
            capacity=capacity,
        )
        self._outgoing.put_nowait(LeaseRequest(hello=hello))

    async def _requests(self) -> AsyncIterator[LeaseRequest]:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def run(self, counter: list[int], total: int, finished: asyncio.Event) -> None:
        send = self._outgoing.put_nowait
        stream = self._stub.Lease(self._requests(), metadata=(("authorization", f"Bearer {self._key}"),))
        beating = asyncio.create_task(self._heartbeat())
        try:
            async for response in stream:
                kind = response.WhichOneof("message")
                if kind == "assignment":
                    lease = response.assignment
                    self._epochs[lease.lease_id] = lease.epoch
                    send(
                        LeaseRequest(
                            progress=LeaseRequest.Progress(
                                lease_id=lease.lease_id, epoch=lease.epoch, state=RUNNING
                            )
                        )
                    )
                elif kind == "ack" and response.ack.state == RUNNING:
                    lease_id = response.ack.lease_id
                    send(
                        LeaseRequest(
                            complete=LeaseRequest.Complete(
                                lease_id=lease_id, epoch=self._epochs.pop(lease_id), outcome=SUCCEEDED
                            )
                        )
                    )
                elif kind == "ack" and response.ack.state == SUCCEEDED:
                    counter[0] += 1
                    if counter[0] >= total:
                        finished.set()
                elif kind == "reject":
                    raise RuntimeError(f"rejected: {response.reject}")
        finally:
            beating.cancel()

    def stop(self) -> None:
        self._outgoing.put_nowait(None)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self._outgoing.put_nowait(LeaseRequest(heartbeat=LeaseRequest.Heartbeat()))


async def measure(
    queue_addresses: list[str],
    registry: RunningService,
    admin_key: str,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, object]:
    async with contextlib.AsyncExitStack() as channels:
        stubs = [
            queue_pb2_grpc.QueueServiceStub(
                await channels.enter_async_context(open_aio_channel(address, api_key=admin_key))
            )
            for address in queue_addresses
        ]
        queue = await _create_queue(stubs[0])
        key = await _agent_key(registry.address, admin_key, queue)
        spread = [stubs[index % len(stubs)] for index in range(max(args.agents, args.enqueuers))]
        agents = [SyntheticAgent(stub, queue, args.capacity, key) for stub in spread[: args.agents]]
        counter, finished = [0], asyncio.Event()
        streams = [asyncio.create_task(agent.run(counter, args.items, finished)) for agent in agents]
        await asyncio.sleep(0.5)  # every Hello answered: the first Enqueues find agents waiting
        left = list(range(args.items))

        async def enqueuer(stub: queue_pb2_grpc.QueueServiceAsyncStub) -> None:
            while left:
                left.pop()
                await stub.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=args.job))

        cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        postgres_before = _postgres_cpu_seconds() if args.database == "postgresql" else {}
        calls_before = _rpc_calls(registry.metrics_address)
        started = time.perf_counter()
        enqueuing = asyncio.gather(*(enqueuer(stub) for stub in spread[: args.enqueuers]))
        waiting = asyncio.create_task(finished.wait())
        # Every item's Complete acknowledged, or a stream that failed (then its error is raised).
        await asyncio.wait([waiting, *streams], return_when=asyncio.FIRST_COMPLETED)
        for task in streams:
            if task.done():
                task.result()
        await enqueuing
        elapsed = time.perf_counter() - started
        cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        postgres_after = _postgres_cpu_seconds()
        calls = _rpc_calls(registry.metrics_address)
        calls.subtract(calls_before)
        for agent in agents:
            agent.stop()
        await asyncio.gather(*streams, return_exceptions=True)
    # The queue's figure is every replica's together; each replica's own is kept beside it.
    cpu["queue"] = sum(seconds for name, seconds in cpu.items() if name.startswith("queue_"))
    if postgres_before:
        # Backends alive at both ends: the services' pooled connections (and any other session's).
        cpu["postgres"] = sum(
            postgres_after[pid] - before for pid, before in postgres_before.items() if pid in postgres_after
        )
    result: dict[str, object] = {
        "items": args.items,
        "seconds": round(elapsed, 3),
        "life_cycles_per_second": round(args.items / elapsed, 1),
    }
    for name, seconds in sorted(cpu.items()):
        result[f"{name}_cpu_ms_per_life_cycle"] = round(seconds / args.items * 1e3, 3)
        result[f"{name}_cpu_share"] = round(seconds / elapsed, 3)
    result["registry_calls_per_life_cycle"] = {
        method: round(count / args.items, 2) for method, count in sorted(calls.items()) if count
    }
    return result


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _postgres_cpu_seconds() -> dict[int, float]:
    """CPU seconds of every PostgreSQL server process now (none when it runs elsewhere)."""
    seconds = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "postgres":
                seconds[int(entry.name)] = _cpu_seconds(int(entry.name))
    return seconds


def _rpc_calls(metrics_address: str) -> collections.Counter[str]:
    """Calls the service answered so far, by method, from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    calls: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handling_seconds_count":
                calls[sample.labels["grpc_method"]] += int(sample.value)
    return calls


@contextlib.contextmanager
def _database(kind: str) -> Iterator[None]:
    """Point every service of the stack at a fresh PostgreSQL schema (SQLite needs nothing)."""
    if kind == "sqlite":
        yield
        return
    url = os.environ["TAKEOFF_TEST_POSTGRES_URL"]
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    os.environ["TAKEOFF_DATABASE_URL"] = f"{url}?options=-csearch_path%3D{schema}"
    try:
        yield
    finally:
        del os.environ["TAKEOFF_DATABASE_URL"]
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def _more_replicas(home: Path, record: StackRecord, count: int) -> Iterator[list[tuple[int, str]]]:
    """``count`` more queue processes beside the stack's, configured as its queue is (registry, service key,
    database from the environment); yields each one's (pid, address), stops them after."""
    children = []
    try:
        for index in range(count):
            replica_home = home / f"replica-{index + 1}"
            replica_home.mkdir()
            ready = replica_home / "queue.ready"
            env = {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES}
            env |= {
                "TAKEOFF_HOME": str(replica_home),
                "TAKEOFF_LISTEN": json.dumps(["127.0.0.1:0"]),
                "TAKEOFF_READY_FILE": str(ready),
                "TAKEOFF_REGISTRY_ADDRESS": record.services["registry"].address,
                "TAKEOFF_API_KEY_FILE": str(keys_dir(home) / "queue.key"),
                "TAKEOFF_PAGE_TOKEN_KEY_FILE": str(home / PAGE_TOKEN_KEY_FILE),  # the stack's queue's
            }
            with (replica_home / "queue.log").open("ab") as log:
                child = subprocess.Popen([PYTHON, "-m", "takeoff_queue"], env=env, stdout=log, stderr=log)
            children.append((child, ready))
        started = []
        for child, ready in children:
            while not ready.exists():
                if child.poll() is not None:
                    raise RuntimeError(f"a queue replica exited with {child.returncode}; see {ready.parent}")
                time.sleep(0.05)
            started.append((child.pid, json.loads(ready.read_text())["addresses"][0]))
        yield started
    finally:
        for child, _ in children:
            child.terminate()
        for child, _ in children:
            child.wait()


@contextlib.contextmanager
def _profiled_queue(home: Path, profile: str | None) -> Iterator[None]:
    """Start the queue service under cProfile (``profile``: where its stats go when it stops)."""
    if profile is None:
        yield
        return
    wrapper = home / "python-profiled"
    real = sys.executable
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$2" = takeoff_queue ]; then exec {real} -m cProfile -o {profile} "$@"; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    sys.executable = str(wrapper)  # LocalStack starts each service as sys.executable -m takeoff_<name>
    try:
        yield
    finally:
        sys.executable = real


@contextlib.contextmanager
def _home(keep: bool) -> Iterator[str]:
    """A temporary TAKEOFF_HOME; with ``keep``, left in place (each service's log is under it) and named."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as home:
            yield home
        return
    home = tempfile.mkdtemp(prefix="takeoff-bench-")
    print(f"the stack's home, kept: {home}", file=sys.stderr)
    yield home


def run(args: argparse.Namespace) -> dict[str, object]:
    lift_enqueue_limit()
    os.environ["TAKEOFF_METRICS_LISTEN"] = "127.0.0.1:0"  # the registry's calls are counted there
    if args.sqlite_sync:
        os.environ["TAKEOFF_SQLITE_SYNCHRONOUS"] = args.sqlite_sync
    if args.replicas:
        os.environ["TAKEOFF_REPLICAS"] = "true"
    with (
        _home(args.keep) as home,
        _database(args.database),
        _profiled_queue(Path(home), args.profile),
        bench_stack(Path(home)) as (stack, record),
        _more_replicas(Path(home), record, max(0, args.replicas - 1)) as replicas,
    ):
        pids = {
            "queue_0": record.services["queue"].pid,
            **{f"queue_{index + 1}": pid for index, (pid, _) in enumerate(replicas)},
            "registry": record.services["registry"].pid,
            "client": os.getpid(),
        }
        registry = record.services["registry"]
        addresses = [record.services["queue"].address, *(address for _, address in replicas)]
        result = asyncio.run(measure(addresses, registry, stack.admin_key, args, pids))
    return {
        "database": args.database,
        "replicas": args.replicas,
        "sqlite_sync": args.sqlite_sync or "default",
        "job": args.job,
        **result,
    }


def top_functions(profile: str, count: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(count)
    return out.getvalue()


def print_table(results: list[dict[str, object]]) -> None:
    print(json.dumps(results, indent=2))
    columns = ["database", "replicas", "sqlite_sync", "job", "items", "life_cycles_per_second"]
    columns += [f"{name}_cpu_ms_per_life_cycle" for name in ("queue", "registry", "client", "postgres")]
    headers = ["database", "replicas", "sync", "job", "items", "cycles/s"]
    headers += ["queue cpu ms", "registry cpu ms", "client cpu ms", "postgres cpu ms", "registry calls"]
    print("\n" + " ".join(f"{header:>15}" for header in headers))
    for row in results:
        calls = row["registry_calls_per_life_cycle"]
        assert isinstance(calls, dict)
        cells = [*(row.get(column, "-") for column in columns), round(sum(calls.values()), 2)]
        print(" ".join(f"{cell!s:>15}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--enqueuers", type=int, default=64)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--job", default="bench", help="the reference enqueued: bench (latest, asked each time) or bench:v0"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="queue processes with replicas on (PostgreSQL); 0: one, replicas off",
    )
    parser.add_argument("--sqlite-sync", choices=["NORMAL", "FULL"], default=None)
    parser.add_argument("--profile", default=None, help="write the queue service's cProfile stats here")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep each run's home and its services' logs")
    args = parser.parse_args()
    if args.replicas and args.database != "postgresql":
        parser.error("--replicas needs --database postgresql (replicas are refused on SQLite)")
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    print_table([run(args) for _ in range(args.runs)])
    if args.profile:
        print(top_functions(args.profile))


if __name__ == "__main__":
    main()
