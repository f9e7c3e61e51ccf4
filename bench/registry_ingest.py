"""How fast a real registry stores what clients send (metric rows, artifact bytes) and passes new log
lines on to a follower.

Starts ``python -m takeoff_registry`` on a free loopback port with a temporary TAKEOFF_HOME (SQLite, or
``--database-url``), then from this process: BatchLogMetrics calls of ``--batch`` rows each (three
numeric keys per row, one call in flight, as the SDK's sender sends them) until ``--rows`` are stored,
an UploadArtifact of ``--artifact-mib`` MiB in 1 MiB chunks, and ``--follow-lines`` AppendLogs calls of
one line each while a ``ReadLogs(follow=True)`` stream is open, each timed from the append to the line
reaching the follower (goal: well under the registry's 1 s follow poll, i.e. woken by the append). Prints
rows/s, MB/s and follow latency (p50, p99 ms) as JSON.

    python bench/registry_ingest.py [--rows 200000] [--batch 1000 --batch 10000] [--follow-lines 200]
        [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import statistics
import tarfile
import time
from collections.abc import AsyncIterator

import grpc
from local_services import new_admin_key, registry_process

from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_aio_channel

MIB = 1024 * 1024


async def metric_rows_per_second(runs: runs_pb2_grpc.RunServiceAsyncStub, rows: int, batch: int) -> float:
    created = await runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/bench"))
    name = created.run.name
    batches = [
        runs_pb2.BatchLogMetricsRequest(
            name=name,
            first_row_index=start,
            rows=[
                runs_pb2.MetricRow(step=step, values={"loss": 1 / (step + 1), "accuracy": 0.5, "epoch": 3.0})
                for step in range(start, min(start + batch, rows))
            ],
        )
        for start in range(0, rows, batch)
    ]
    started = time.perf_counter()
    for request in batches:
        await runs.BatchLogMetrics(request)
    elapsed = time.perf_counter() - started
    stored = (await runs.GetRun(runs_pb2.GetRunRequest(name=name))).run.history_length
    assert stored == rows, f"{stored} of {rows} rows stored"
    return rows / elapsed


def random_tarball(size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        payload = os.urandom(size)  # incompressible, so the tarball is about `size` bytes
        member = tarfile.TarInfo("weights.bin")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


async def upload_megabytes_per_second(jobs: jobs_pb2_grpc.JobServiceAsyncStub, data: bytes) -> float:
    sha256 = hashlib.sha256(data).hexdigest()

    async def messages() -> AsyncIterator[jobs_pb2.UploadArtifactRequest]:
        header = jobs_pb2.ArtifactUploadHeader(parent="projects/bench", sha256=sha256, size_bytes=len(data))
        yield jobs_pb2.UploadArtifactRequest(header=header)
        for offset in range(0, len(data), MIB):
            yield jobs_pb2.UploadArtifactRequest(chunk=data[offset : offset + MIB])

    started = time.perf_counter()
    await jobs.UploadArtifact(messages())
    return len(data) / 1e6 / (time.perf_counter() - started)


async def follow_latencies_ms(runs: runs_pb2_grpc.RunServiceAsyncStub, lines: int) -> list[float]:
    """For each of ``lines`` appends: milliseconds from the AppendLogs call to the follower having it."""
    created = await runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/bench"))
    name = created.run.name
    follower = runs.ReadLogs(runs_pb2.ReadLogsRequest(name=name, follow=True))
    latencies = []
    for number in range(lines):
        started = time.perf_counter()
        await runs.AppendLogs(
            runs_pb2.AppendLogsRequest(name=name, lines=[runs_pb2.LogLine(text=f"line {number}")])
        )
        received = await follower.read()
        latencies.append((time.perf_counter() - started) * 1000)
        assert isinstance(received, runs_pb2.ReadLogsResponse)
        assert received.lines[-1].text == f"line {number}", received
    await runs.FinishRun(runs_pb2.FinishRunRequest(name=name, state=common_pb2.RUN_STATE_FINISHED))
    while await follower.read() is not grpc.aio.EOF:  # the follow ends once the run has
        pass
    return latencies


async def measure(
    address: str, key: str, rows: int, batches: list[int], *, artifact_mib: int, follow_lines: int
) -> dict[str, float]:
    results: dict[str, float] = {}
    async with open_aio_channel(address, api_key=key) as channel:
        runs = runs_pb2_grpc.RunServiceStub(channel)
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await metric_rows_per_second(runs, 10_000, 1000)  # warm-up
        for batch in batches:
            results[f"batch_log_metrics_rows_per_s_batch_{batch}"] = round(
                await metric_rows_per_second(runs, rows, batch)
            )
        if artifact_mib:
            results["upload_artifact_mb_per_s"] = round(
                await upload_megabytes_per_second(jobs, random_tarball(artifact_mib * MIB)), 1
            )
        if follow_lines:
            latencies = sorted(await follow_latencies_ms(runs, follow_lines))
            results["follow_latency_p50_ms"] = round(statistics.median(latencies), 2)
            results["follow_latency_p99_ms"] = round(latencies[int(0.99 * (len(latencies) - 1))], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, action="append", help="rows per call (repeatable)")
    parser.add_argument("--artifact-mib", type=int, default=64)
    parser.add_argument("--follow-lines", type=int, default=200, help="appends timed to a follower (0: none)")
    parser.add_argument("--database-url", help="PostgreSQL URL; default: SQLite under a temporary home")
    args = parser.parse_args()
    key = new_admin_key()
    with registry_process(database_url=args.database_url, admin_key=key) as registry:
        results = asyncio.run(
            measure(
                registry.address,
                key,
                args.rows,
                args.batch or [1000, 10_000],
                artifact_mib=args.artifact_mib,
                follow_lines=args.follow_lines,
            )
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
