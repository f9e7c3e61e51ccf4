"""How fast offline mode writes a run to disk, and how fast ``takeoff sync`` uploads it to a real registry.

In this process: ``takeoff.init(mode="offline")`` into a temporary directory, ``--rows`` calls of
``run.log`` with three numeric keys in a tight loop, then ``run.finish()``, which returns once every row is
on disk (fsynced): the write rate is rows / (first log until finish returned). Then starts
``python -m takeoff_registry`` on a free loopback port (or uses ``--registry ADDRESS``) and syncs the run
directory as ``takeoff sync`` does: the sync rate is rows / the whole sync (CreateRun to FinishRun).
GetRun's ``history_length`` confirms the count. The registry accepts 500,000 rows at once and 10,000
rows/s per run after that, so runs over 500,000 rows sync at about that rate.

    python bench/offline_sync.py [--rows 200000] [--registry HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from sdk_log import local_registry

import takeoff
from takeoff._sync import sync_run


def write_offline(directory: Path, rows: int) -> tuple[Path, dict[str, float]]:
    os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # the rows measured are the loop's own
    run = takeoff.init(project="bench", config={"rows": rows}, mode="offline", dir=directory)
    log = run.log
    clock = time.perf_counter_ns
    costs = [0] * rows
    started = clock()
    for i in range(rows):
        before = clock()
        log({"loss": 1.0 / (i + 1), "accuracy": i / rows, "epoch": i // 1000})
        costs[i] = clock() - before
    run.finish()
    finished = clock()
    (run_directory,) = (directory / "takeoff").glob(f"offline-run-*-{run.id}")
    return run_directory, {
        "log_p50_us": round(statistics.median(costs) / 1e3, 3),
        "written_rows_per_second": round(rows / ((finished - started) / 1e9)),
        "written_bytes_per_row": round(sum(f.stat().st_size for f in run_directory.iterdir()) / rows),
    }


def sync(address: str, run_directory: Path, rows: int) -> dict[str, float]:
    with takeoff.Client(address, project="bench") as client:
        started = time.perf_counter()
        result = sync_run(run_directory, client)
        seconds = time.perf_counter() - started
        stored = client.get_run(result.run).history_length
    if stored != rows:
        raise SystemExit(f"the registry stored {stored} rows, not {rows}")
    return {"sync_seconds": round(seconds, 3), "synced_rows_per_second": round(rows / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--registry", help="use this registry instead of starting one")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-offline-") as directory:
        run_directory, written = write_offline(Path(directory), arguments.rows)
        if arguments.registry:
            synced = sync(arguments.registry, run_directory, arguments.rows)
        else:
            with local_registry() as address:
                synced = sync(address, run_directory, arguments.rows)
    result = {"rows": arguments.rows, "keys_per_row": 3, **written, **synced}
    print(json.dumps(result, indent=2))
    print(f"\n{'run.log p50 (offline)':<24}{result['log_p50_us']:>10.2f} µs")
    print(f"{'written offline':<24}{result['written_rows_per_second']:>10,} rows/s")
    print(f"{'synced':<24}{result['synced_rows_per_second']:>10,} rows/s")


if __name__ == "__main__":
    main()
