"""Tracing's cost: dispatch latency (bench/dispatch.py) and launch latency (bench/launch_latency.py,
local-process) with every process exporting its spans over OTLP, against tracing off.

Each run measures both, off then on, on fresh stacks; ``--runs N`` repeats that, so a shared machine's
load spreads over both modes. "On" is ``OTEL_TRACES_EXPORTER=otlp`` to a receiver in a process of its
own (``tests/observability/collector.py``; in this process its threads would slow the measuring client),
with the SDK's default batching (a batch every 5 s); "off" is the default, ``none``: servers' spans carry
ids and record nothing, and the job's SDK records none. Goal: dispatch p50 at most 10 % slower.
Prints JSON and a table.

    python bench/tracing_overhead.py [--items 300] [--launches 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dispatch
import launch_latency

from takeoff.models import ResourceKind

REPOSITORY = Path(__file__).resolve().parents[1]
TRACING = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT")


@contextmanager
def exported(on: bool) -> Iterator[list[int]]:
    """The environment the stacks started inside inherit: spans exported to a receiver, or none. Yields a
    list that holds, afterwards, how many spans the receiver got."""
    received: list[int] = []
    saved = {name: os.environ.pop(name, None) for name in TRACING}
    receiver = None
    if on:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "tests.observability.collector"],
            cwd=REPOSITORY,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert receiver.stdout is not None
        address = receiver.stdout.readline().strip()
        os.environ.update(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{address}"}
        )
    try:
        yield received
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        if receiver is not None:
            output, _ = receiver.communicate("")  # its stdin closes: it prints its count and exits
            received.append(int(output.split()[-1]))


def measure(on: bool, items: int, launches: int) -> dict[str, float]:
    with exported(on) as received:
        dispatched = dispatch.run(items, 0)
        launched = launch_latency._run(ResourceKind.LOCAL_PROCESS, None, launches)[launch_latency.TOTAL]
    return {
        "dispatch_p50_ms": dispatched["p50_ms"],
        "dispatch_p90_ms": dispatched["p90_ms"],
        "launch_p50_ms": round(statistics.median(launched), 1),
        "launch_p90_ms": round(sorted(launched)[int(len(launched) * 0.9) - 1], 1),
        "spans_received": received[0] if received else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=300, help="dispatches timed per stack")
    parser.add_argument("--launches", type=int, default=10, help="launches timed per stack")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    rows = [
        (mode, measure(mode == "otlp", args.items, args.launches))
        for _ in range(args.runs)
        for mode in ("off", "otlp")
    ]
    summary = {}
    for key in ("dispatch_p50_ms", "launch_p50_ms"):
        off = [row[key] for mode, row in rows if mode == "off"]
        on = [row[key] for mode, row in rows if mode == "otlp"]
        overhead = key.replace("_ms", "_overhead_percent")
        summary[overhead] = round(
            (statistics.median(on) - statistics.median(off)) / statistics.median(off) * 100, 1
        )
        # Each run's two stacks met about the same load: the median of the runs' own ratios is less noisy.
        ratios = [after / before for before, after in zip(off, on, strict=True)]
        summary[f"{overhead}_paired"] = round((statistics.median(ratios) - 1) * 100, 1)
    listed = [{"tracing": mode, **row} for mode, row in rows]
    print(json.dumps({"items": args.items, "launches": args.launches, "rows": listed, **summary}, indent=2))
    columns = ("dispatch_p50_ms", "dispatch_p90_ms", "launch_p50_ms", "launch_p90_ms", "spans_received")
    print(f"\n{'tracing':>8} " + " ".join(f"{column:>16}" for column in columns))
    for mode, row in rows:
        print(f"{mode:>8} " + " ".join(f"{row[column]:>16}" for column in columns))
    print(
        f"\noverhead of exporting (medians): dispatch p50 {summary['dispatch_p50_overhead_percent']:+}%, "
        f"launch p50 {summary['launch_p50_overhead_percent']:+}%; median of each run's own ratio: dispatch "
        f"{summary['dispatch_p50_overhead_percent_paired']:+}%, launch "
        f"{summary['launch_p50_overhead_percent_paired']:+}% (goal: dispatch <= +10%)"
    )


if __name__ == "__main__":
    main()
