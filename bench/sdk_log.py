"""What ``run.log`` costs a training loop, and how many rows per second reach a real registry.

Starts ``python -m takeoff_registry`` on a free loopback port with a temporary TAKEOFF_HOME (or uses
``--registry ADDRESS``), then in this process, twice: ``takeoff.init``, ``--rows`` calls of ``run.log``
with three numeric keys in a tight loop, each timed, then ``run.finish()``. The first run has system
metrics off; the second has them on, sampled every ``--system-interval`` seconds (a hundred times a
second by default, a thousand times the default rate, so that the sampler thread runs while the loop
does and its cost shows; it overstates what a job pays). Reports the per-call cost (p50, p99, mean), how
many system samples were taken during the loop, and the delivery rate: rows / (time from the first log
until ``finish`` returned, i.e. every row stored). GetRun's ``history_length`` confirms the count.
Goals (issue 13): p50 <= 1 µs per call with system metrics on; 50,000 rows/s delivered.

    python bench/sdk_log.py [--rows 100000] [--system-interval 0.01] [--registry HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from local_services import new_admin_key, registry_process

import takeoff

SYSTEM_METRICS_ENV = "TAKEOFF_SYSTEM_METRICS"
SYSTEM_INTERVAL_ENV = "TAKEOFF_SYSTEM_METRICS_INTERVAL"
SAMPLE_KEY = "system/cpu_percent"  # in every system sample
P50_GOAL_US = 1
ROWS_GOAL = 50_000


@contextmanager
def local_registry() -> Iterator[str]:
    """A quiet registry on a free loopback port whose admin key this process presents (TAKEOFF_API_KEY,
    which bench/artifacts.py and bench/offline_sync.py read too)."""
    os.environ["TAKEOFF_API_KEY"] = key = new_admin_key()
    with registry_process(admin_key=key, quiet=True) as registry:
        yield registry.address


def measure(address: str, rows: int, system_interval: float | None) -> dict[str, float]:
    """One run of ``rows`` timed ``run.log`` calls; system metrics off when ``system_interval`` is None."""
    os.environ["TAKEOFF_REGISTRY"] = address
    if system_interval is None:
        os.environ[SYSTEM_METRICS_ENV] = "0"
    else:
        os.environ.pop(SYSTEM_METRICS_ENV, None)
        os.environ[SYSTEM_INTERVAL_ENV] = str(system_interval)
    run = takeoff.init(project="bench", config={"rows": rows})
    log = run.log
    clock = time.perf_counter_ns
    costs = [0] * rows
    loop_began = time.time_ns()
    started = clock()
    for i in range(rows):
        before = clock()
        log({"loss": 1.0 / (i + 1), "accuracy": i / rows, "epoch": i // 1000})
        costs[i] = clock() - before
    logged = clock()
    loop_ended = time.time_ns()
    run.finish()
    finished = clock()
    with takeoff.Client(address, project="bench") as client:
        stored = client.get_run(run.id).history_length
        samples = [row.time for row in client.read_metrics(run.id, keys=[SAMPLE_KEY]) if row.time]
    if stored - len(samples) != rows:
        raise SystemExit(f"the registry stored {stored - len(samples)} logged rows, not {rows}")
    in_loop = sum(loop_began <= sample.timestamp() * 1e9 <= loop_ended for sample in samples)
    ordered = sorted(costs)
    return {
        "log_p50_us": round(statistics.median(ordered) / 1e3, 3),
        "log_p99_us": round(ordered[int(rows * 0.99) - 1] / 1e3, 3),
        "log_mean_us": round(statistics.fmean(costs) / 1e3, 3),
        "loop_seconds": round((logged - started) / 1e9, 3),
        "system_samples_in_loop": in_loop,
        "finish_seconds": round((finished - logged) / 1e9, 3),
        "delivered_rows_per_second": round(rows / ((finished - started) / 1e9)),
        "stored_rows": stored,
    }


def measure_both(address: str, rows: int, system_interval: float) -> dict[str, dict[str, float]]:
    return {
        "system metrics off": measure(address, rows, None),
        f"system metrics every {system_interval:g} s": measure(address, rows, system_interval),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--system-interval", type=float, default=0.01, help="seconds between system samples")
    parser.add_argument("--registry", help="use this registry instead of starting one")
    arguments = parser.parse_args()
    if arguments.registry:
        results = measure_both(arguments.registry, arguments.rows, arguments.system_interval)
    else:
        with local_registry() as address:
            results = measure_both(address, arguments.rows, arguments.system_interval)
    print(json.dumps({"rows": arguments.rows, "keys_per_row": 3, **results}, indent=2))
    for name, result in results.items():
        print(f"\n{name}:")
        print(f"  {'run.log p50':<22}{result['log_p50_us']:>10.2f} µs   (goal <= {P50_GOAL_US} µs)")
        print(f"  {'run.log p99':<22}{result['log_p99_us']:>10.2f} µs")
        print(f"  {'run.log mean':<22}{result['log_mean_us']:>10.2f} µs")
        print(f"  {'system samples':<22}{result['system_samples_in_loop']:>10} during the loop")
        print(
            f"  {'delivered':<22}{result['delivered_rows_per_second']:>10,} rows/s   (goal >= {ROWS_GOAL:,})"
        )
        print(f"  {'finish() drained in':<22}{result['finish_seconds']:>10.2f} s")


if __name__ == "__main__":
    main()
