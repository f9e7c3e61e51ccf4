"""What ``run.log`` costs a training loop, and how many rows per second reach a real registry.

Starts ``python -m takeoff_registry`` on a free loopback port with a temporary TAKEOFF_HOME (or uses
``--registry ADDRESS``), then in this process: ``takeoff.init``, ``--rows`` calls of ``run.log`` with
three numeric keys in a tight loop, each timed, then ``run.finish()``. Reports the per-call cost (p50,
p99, mean) and the delivery rate: rows / (time from the first log until ``finish`` returned, i.e. every
row stored). GetRun's ``history_length`` confirms the count. Goals: under 20 µs per call, 50,000 rows/s.

    python bench/sdk_log.py [--rows 100000] [--registry HOST:PORT]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import takeoff


@contextmanager
def local_registry() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as home:
        ready = Path(home) / "registry.ready"
        process = subprocess.Popen(
            [sys.executable, "-m", "takeoff_registry"],
            env={
                **os.environ,
                "TAKEOFF_HOME": home,
                "TAKEOFF_LISTEN": json.dumps(["127.0.0.1:0"]),
                "TAKEOFF_READY_FILE": str(ready),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the registry did not start")
                time.sleep(0.05)
            yield json.loads(ready.read_text())["addresses"][0]
        finally:
            process.terminate()
            process.wait()


def measure(address: str, rows: int) -> dict[str, float]:
    os.environ["TAKEOFF_REGISTRY"] = address
    run = takeoff.init(project="bench", config={"rows": rows})
    log = run.log
    clock = time.perf_counter_ns
    costs = [0] * rows
    started = clock()
    for i in range(rows):
        before = clock()
        log({"loss": 1.0 / (i + 1), "accuracy": i / rows, "epoch": i // 1000})
        costs[i] = clock() - before
    logged = clock()
    run.finish()
    finished = clock()
    with takeoff.Client(address, project="bench") as client:
        stored = client.get_run(run.id).history_length
    if stored != rows:
        raise SystemExit(f"the registry stored {stored} rows, not {rows}")
    ordered = sorted(costs)
    return {
        "log_p50_us": round(statistics.median(ordered) / 1e3, 3),
        "log_p99_us": round(ordered[int(rows * 0.99) - 1] / 1e3, 3),
        "log_mean_us": round(statistics.fmean(costs) / 1e3, 3),
        "loop_seconds": round((logged - started) / 1e9, 3),
        "finish_seconds": round((finished - logged) / 1e9, 3),
        "delivered_rows_per_second": round(rows / ((finished - started) / 1e9)),
        "stored_rows": stored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--registry", help="use this registry instead of starting one")
    arguments = parser.parse_args()
    if arguments.registry:
        result = measure(arguments.registry, arguments.rows)
    else:
        with local_registry() as address:
            result = measure(address, arguments.rows)
    print(json.dumps({"rows": arguments.rows, "keys_per_row": 3, **result}, indent=2))
    print(f"\n{'run.log p50':<24}{result['log_p50_us']:>10.2f} µs   (goal < 20 µs)")
    print(f"{'run.log p99':<24}{result['log_p99_us']:>10.2f} µs")
    print(f"{'run.log mean':<24}{result['log_mean_us']:>10.2f} µs")
    print(f"{'delivered':<24}{result['delivered_rows_per_second']:>10,} rows/s   (goal >= 50,000)")
    print(f"{'finish() drained in':<24}{result['finish_seconds']:>10.2f} s")


if __name__ == "__main__":
    main()
