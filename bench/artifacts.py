"""Named artifacts: upload and download throughput on loopback, a re-log of unchanged files, and the time a
resumed attempt loses before its first new step (docs/design.md §8).

Starts ``python -m takeoff_registry`` on a free loopback port (or uses ``--registry ADDRESS``) and, with a
fresh blob cache in a temporary directory:

- **one large file** (``--big-mib``, default 512 MiB of random bytes) and **many small files**
  (``--small-count`` x ``--small-kib``, default 1000 x 100 KiB): ``Client.log_artifact`` timed whole and
  split into hashing the files and the rest (FindMissingBlobs and the CreateArtifactVersion stream, which
  the registry hashes and stores as it arrives); then the same files logged again (hashed again, nothing
  sent: the existing version comes back); then ``fetch_artifact`` into an empty cache (every byte fetched,
  its digest checked, the files copied out of the cache) and again into another directory (the cache has
  every blob: the files are copies, a reflink where the file system can).
  MB/s are 10^6 bytes per second of the artifact's size over the whole call.
- **resume**: a run of attempt 1 of a queue item with ``--resume-rows`` rows and a checkpoint of
  ``--checkpoint-mib`` MiB, then a job process for attempt 2 that does what a resuming job does:
  ``import takeoff``, ``init(resume="allow")``, ``use_artifact("ckpt:latest").download()``, read the
  checkpoint, log its first step. The job stamps the time after each; measured from the parent's
  ``Popen`` (so the interpreter's start is in), with an empty blob cache (an attempt on another machine)
  and with a warm one (the same machine). What the queue adds before the process starts (the lease to
  expire, the retry back-off, the agent starting the job) is ``bench/recovery.py``'s.

Prints JSON and a table.

    python bench/artifacts.py [--big-mib 512] [--small-count 1000] [--small-kib 100] [--repeats 1]
        [--checkpoint-mib 64] [--resume-rows 10000] [--registry HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdk_log import local_registry

from takeoff import Client
from takeoff._artifacts import local_files
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel

PROJECT = "bench"
MB = 1_000_000
WRITE_CHUNK = 8 * 1024 * 1024

RESUMING_JOB = """\
import json, sys, time
stamps = {"started": time.time()}
import takeoff
stamps["imported"] = time.time()
run = takeoff.init(resume="allow")
stamps["attached"] = time.time()
version = run.use_artifact("ckpt:latest")
stamps["resolved"] = time.time()
directory = version.download(sys.argv[1])
stamps["downloaded"] = time.time()
with open(directory / "model.bin", "rb") as checkpoint:
    while checkpoint.read(8 << 20):
        pass
stamps["loaded"] = time.time()
run.log({"loss": 0.5})
stamps["first_step"] = time.time()
run.finish()
print(json.dumps({"stamps": stamps, "step": run.step - 1, "resumed_from": run.resumed_from}))
"""


def random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        for start in range(0, size, WRITE_CHUNK):
            stream.write(os.urandom(min(WRITE_CHUNK, size - start)))


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = action(*args, **kwargs)
    return time.perf_counter() - began, result


def transfer(client: Client, source: Path, artifact: str, work: Path, repeats: int) -> dict[str, Any]:
    """Log ``source`` ``repeats`` times, each into a project of its own (blobs are stored once per project,
    so every upload sends everything), log it again unchanged, fetch it cold and warm."""
    size = sum(file.size_bytes for file in local_files(source))
    hashing, uploads, relogs, cold, warm = [], [], [], [], []
    for repeat in range(repeats):
        project = f"{PROJECT}-{artifact}-{repeat}-{time.time_ns()}"
        os.environ["TAKEOFF_CACHE_DIR"] = str(work / f"cache-{artifact}-{repeat}")
        hashing.append(timed(local_files, source)[0])
        seconds, version = timed(client.log_artifact, source, artifact, type="bench", project=project)
        assert not version.already_existed
        uploads.append(seconds)
        seconds, again = timed(client.log_artifact, source, artifact, type="bench", project=project)
        assert again.already_existed
        relogs.append(seconds)
        seconds, (_, fetched) = timed(client.fetch_artifact, version, work / f"{artifact}-{repeat}-a")
        assert fetched == size
        cold.append(seconds)
        seconds, (_, fetched) = timed(client.fetch_artifact, version, work / f"{artifact}-{repeat}-b")
        assert fetched == 0
        warm.append(seconds)
    p50 = statistics.median
    return {
        "bytes": size,
        "files": len(local_files(source)),
        "hash_seconds": p50(hashing),
        "upload_seconds": p50(uploads),
        "upload_mb_per_second": size / MB / p50(uploads),
        "upload_after_hashing_mb_per_second": size / MB / max(p50(uploads) - p50(hashing), 1e-9),
        "relog_seconds": p50(relogs),
        "download_seconds": p50(cold),
        "download_mb_per_second": size / MB / p50(cold),
        "cached_download_seconds": p50(warm),
    }


def resume(address: str, client: Client, work: Path, checkpoint_mib: int, rows: int) -> dict[str, Any]:
    """A first attempt's run with rows and a checkpoint, then the second attempt's job, cold and warm."""
    checkpoint = work / "ckpt"
    random_file(checkpoint / "model.bin", checkpoint_mib * 1024 * 1024)
    results: dict[str, Any] = {"checkpoint_bytes": checkpoint_mib * 1024 * 1024, "rows": rows}
    with open_channel(address, api_key=os.environ["TAKEOFF_API_KEY"]) as channel:
        runs = runs_pb2_grpc.RunServiceStub(channel)
        for case in ("cold", "warm"):
            item = f"projects/{PROJECT}/queues/q/items/{case}"
            first = runs.CreateRun(
                runs_pb2.CreateRunRequest(
                    parent=f"projects/{PROJECT}",
                    run_id=f"{case}-1",
                    run=runs_pb2.Run(queue_item=item, attempt=1),
                )
            ).run.name
            runs.AttachRun(runs_pb2.AttachRunRequest(name=first))
            for start in range(0, rows, 10_000):
                batch = [
                    runs_pb2.MetricRow(step=step, values={"loss": 1 / (step + 1)})
                    for step in range(start, min(rows, start + 10_000))
                ]
                runs.BatchLogMetrics(
                    runs_pb2.BatchLogMetricsRequest(name=first, rows=batch, first_row_index=start)
                )
            client.log_artifact(checkpoint, "ckpt", type="checkpoint", run=first)
            runs.FinishRun(runs_pb2.FinishRunRequest(name=first, state=common_pb2.RUN_STATE_KILLED))
            runs.CreateRun(
                runs_pb2.CreateRunRequest(
                    parent=f"projects/{PROJECT}",
                    run_id=f"{case}-2",
                    run=runs_pb2.Run(queue_item=item, attempt=2),
                )
            )
            cache = work / "job-cache"  # the warm case finds the cold case's blobs
            env = {
                **os.environ,
                "TAKEOFF_REGISTRY": address,
                "TAKEOFF_PROJECT": PROJECT,
                "TAKEOFF_RUN_ID": f"{case}-2",
                "TAKEOFF_CACHE_DIR": str(cache),
                "TAKEOFF_SYSTEM_METRICS": "0",
            }
            began = time.time()
            job = subprocess.run(
                [sys.executable, "-c", RESUMING_JOB, str(work / f"restored-{case}")],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            report = json.loads(job.stdout)
            assert (report["step"], report["resumed_from"]) == (rows, first), report
            stamps = report["stamps"]
            phases = ("started", "imported", "attached", "resolved", "downloaded", "loaded", "first_step")
            previous = began
            breakdown = {}
            for phase in phases:
                breakdown[phase] = stamps[phase] - previous
                previous = stamps[phase]
            results[case] = {"total_seconds": stamps["first_step"] - began, "phases_seconds": breakdown}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--small-count", type=int, default=1000)
    parser.add_argument("--small-kib", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--checkpoint-mib", type=int, default=64)
    parser.add_argument("--resume-rows", type=int, default=10_000)
    parser.add_argument("--registry", help="use this registry instead of starting one (TAKEOFF_API_KEY)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-artifacts-") as directory:
        work = Path(directory)
        random_file(work / "big" / "model.bin", arguments.big_mib * 1024 * 1024)
        for index in range(arguments.small_count):
            (work / "small" / f"{index // 100:02d}").mkdir(parents=True, exist_ok=True)
            (work / "small" / f"{index // 100:02d}" / f"{index:05d}.bin").write_bytes(
                os.urandom(arguments.small_kib * 1024)
            )

        def measure(address: str) -> dict[str, Any]:
            with Client(address, project=PROJECT) as client:
                return {
                    "big": transfer(client, work / "big", "big", work, arguments.repeats),
                    "small": transfer(client, work / "small", "small", work, arguments.repeats),
                    "resume": resume(address, client, work, arguments.checkpoint_mib, arguments.resume_rows),
                }

        if arguments.registry:
            result = measure(arguments.registry)
        else:
            with local_registry() as address:
                result = measure(address)
    print(json.dumps(result, indent=2))
    print()
    print(
        f"{'':<28}{'size':>10}{'hash':>8}{'upload':>9}{'MB/s':>7}{'re-log':>8}{'download':>10}{'MB/s':>7}{'cached':>8}"
    )
    for name in ("big", "small"):
        row = result[name]
        label, megabytes = f"{row['files']} file(s)", row["bytes"] / MB
        print(
            f"{label:<28}{megabytes:>8.0f}MB{row['hash_seconds']:>7.2f}s{row['upload_seconds']:>8.2f}s"
            f"{row['upload_mb_per_second']:>7.0f}{row['relog_seconds']:>7.2f}s{row['download_seconds']:>9.2f}s"
            f"{row['download_mb_per_second']:>7.0f}{row['cached_download_seconds']:>7.2f}s"
        )
    print()
    resumed = result["resume"]
    print(f"resume: {resumed['checkpoint_bytes'] / MB:.0f} MB checkpoint, {resumed['rows']} rows before")
    for case in ("cold", "warm"):
        phases = "  ".join(
            f"{phase} {seconds:.2f}s" for phase, seconds in resumed[case]["phases_seconds"].items()
        )
        print(f"  {case} cache: first new step {resumed[case]['total_seconds']:.2f}s after Popen ({phases})")


if __name__ == "__main__":
    main()
