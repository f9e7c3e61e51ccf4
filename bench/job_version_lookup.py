"""What a GetJobVersion costs the registry, by number (``train:v0``), by alias (``train:prod``) and by
name (``train``, i.e. ``latest``): the read on the queue's Enqueue and the builder's Build path.

Starts ``python -m takeoff_registry`` on a free loopback port with a temporary TAKEOFF_HOME (SQLite, or
``--database-url``: a fresh schema of that PostgreSQL database, dropped afterwards), makes job ``train``
with two versions and alias ``prod``, then for each reference makes ``--calls`` GetJobVersion calls, one
in flight, and reports the call's latency as the client sees it (p50, p99 ms; a loopback gRPC round trip
is about 0.3 ms of it) and the registry process's CPU per call (its user + system time over the calls,
read from /proc). Then the registry's own part of the call, without gRPC: ``Jobs.resolve`` in this
process on the same database (a registry of its own, no writes meanwhile), its latency and CPU per
resolve. Prints a table, then the numbers as JSON.

    python bench/job_version_lookup.py [--calls 2000] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psycopg
from local_services import new_admin_key, registry_process

from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from takeoff_registry.git_source import GitResolver
from takeoff_registry.jobs import Jobs
from takeoff_registry.refs import JobKey, JobReference
from takeoff_registry.store import RegistryStore
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.database import Database
from takeoff_server.git_access import GitCredentials

JOB = "projects/bench/jobs/train"
REFERENCES = {"number": f"{JOB}:v0", "alias": f"{JOB}:prod", "name": JOB}
KEY = JobKey("bench", "train")
IN_PROCESS = {
    "number": JobReference(KEY, version=0),
    "alias": JobReference(KEY, alias="prod"),
    "name": JobReference(KEY),
}


@contextmanager
def fresh_schema(database_url: str) -> Iterator[str]:
    """``database_url`` with a new, empty schema as its search path; the schema is dropped afterwards."""
    schema = f"bench_lookup_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        separator = "&" if "?" in database_url else "?"
        yield f"{database_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def seed(jobs: jobs_pb2_grpc.JobServiceAsyncStub) -> None:
    for tag in ("3.19", "3.20"):
        version = common_pb2.JobVersion(
            source=common_pb2.JobSource(image=common_pb2.ImageSource(reference=f"alpine:{tag}")),
            entrypoint=["true"],
        )
        await jobs.CreateJobVersion(
            jobs_pb2.CreateJobVersionRequest(parent=JOB, version=version, allow_missing=True)
        )
    await jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=JOB, alias="prod", version=0))


def percentiles(latencies: list[float]) -> dict[str, float]:
    latencies = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
    }


async def resolve_costs(database_url: str, home: Path, calls: int) -> dict[str, dict[str, float]]:
    """``Jobs.resolve`` of each reference in this process: what the registry does inside the call."""
    database = Database("registry", database_url)
    jobs = Jobs(RegistryStore(database), GitResolver(GitCredentials(), timeout=10, scratch_dir=home))
    results: dict[str, dict[str, float]] = {}
    try:
        for kind, reference in IN_PROCESS.items():
            for _ in range(max(calls // 10, 50)):
                await jobs.resolve(reference)
            latencies = []
            cpu_before = time.process_time()
            for _ in range(calls):
                started = time.perf_counter()
                await jobs.resolve(reference)
                latencies.append((time.perf_counter() - started) * 1000)
            cpu_ms = (time.process_time() - cpu_before) * 1000 / calls
            results[kind] = {**percentiles(latencies), "cpu_ms_per_resolve": round(cpu_ms, 3)}
    finally:
        await database.close()
    return results


async def measure(address: str, pid: int, admin_key: str, calls: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with open_aio_channel(address, api_key=admin_key) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await seed(jobs)
        for kind, reference in REFERENCES.items():
            request = jobs_pb2.GetJobVersionRequest(name=reference)
            for _ in range(max(calls // 10, 50)):  # warm-up: connections, caches, the JIT of SQLAlchemy
                await jobs.GetJobVersion(request)
            latencies = []
            cpu_before = cpu_seconds(pid)
            for _ in range(calls):
                started = time.perf_counter()
                await jobs.GetJobVersion(request)
                latencies.append((time.perf_counter() - started) * 1000)
            cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / calls
            results[kind] = {**percentiles(latencies), "registry_cpu_ms_per_call": round(cpu_ms, 3)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per reference")
    parser.add_argument("--database-url", help="PostgreSQL URL; default: SQLite under a temporary home")
    args = parser.parse_args()
    admin_key = new_admin_key()
    database = "postgresql" if args.database_url else "sqlite"
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as temporary:
        home = Path(temporary)
        schema = fresh_schema(args.database_url) if args.database_url else nullcontext(None)
        with schema as url:
            database_url = url or f"sqlite:///{home / 'registry.db'}"
            with registry_process(home, database_url=database_url, admin_key=admin_key) as registry:
                calls = asyncio.run(measure(registry.address, registry.pid, admin_key, args.calls))
            resolves = asyncio.run(resolve_costs(database_url, home, args.calls))
    print(f"{'database':<11} {'reference':<10} {'measured':<24} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms':>8}")
    for kind in REFERENCES:
        for what, numbers, cpu in [
            ("GetJobVersion call", calls[kind], "registry_cpu_ms_per_call"),
            ("Jobs.resolve in-process", resolves[kind], "cpu_ms_per_resolve"),
        ]:
            print(
                f"{database:<11} {kind:<10} {what:<24} {numbers['p50_ms']:>8.3f} {numbers['p99_ms']:>8.3f}"
                f" {numbers[cpu]:>8.3f}"
            )
    print(
        json.dumps({"database": database, "calls": args.calls, "call": calls, "resolve": resolves}, indent=2)
    )


if __name__ == "__main__":
    main()
