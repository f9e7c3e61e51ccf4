"""What importing the SDK costs a process: every job pays ``import takeoff``, every service imports stubs.

Each scenario runs in a fresh ``python -X importtime -c STATEMENT`` several times. Its import time is the
sum of the "self" times of the modules it imports beyond those a bare interpreter (``-c pass``) imports at
start, so interpreter start-up is left out; its CPU time is the interpreter's user + system time less a
bare interpreter's (the median of as many runs), which a busy machine disturbs less than wall-clock time.
Prints medians and the best import time of the repeats, the number of modules the statement imports, and
which of the SDK's heavy parts (client, run machinery, CLI, rich, typer) it loaded.

    python bench/import_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

SCENARIOS = {
    "import takeoff": "import takeoff",
    "import takeoff.v1.queue_pb2": "import takeoff.v1.queue_pb2",
    "import takeoff; takeoff.init": "import takeoff; takeoff.init",
}
HEAVY_MODULES = ("takeoff.client", "takeoff._run", "takeoff.cli", "rich", "typer")


def _run(statement: str) -> tuple[dict[str, int], float]:
    """Module name -> its own import time in microseconds, and the CPU seconds of one fresh interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timings: dict[str, int] = {}
    for line in finished.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        timings[name.strip()] = int(self_us)
    return timings, cpu


def measure(statement: str, repeats: int, baseline: set[str], baseline_cpu: float) -> dict[str, object]:
    import_ms, cpu_ms, modules = [], [], set()
    for _ in range(repeats):
        timings, cpu = _run(statement)
        imported = {name: us for name, us in timings.items() if name not in baseline}
        import_ms.append(sum(imported.values()) / 1000)
        cpu_ms.append((cpu - baseline_cpu) * 1000)
        modules = set(imported)
    return {
        "import_median_ms": round(statistics.median(import_ms), 1),
        "import_best_ms": round(min(import_ms), 1),
        "cpu_median_ms": round(statistics.median(cpu_ms), 1),
        "modules": len(modules),
        "heavy_loaded": [heavy for heavy in HEAVY_MODULES if heavy in modules],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats
    bare = [_run("pass") for _ in range(repeats)]
    baseline = set(bare[0][0])
    baseline_cpu = statistics.median(cpu for _, cpu in bare)
    results = {
        name: measure(statement, repeats, baseline, baseline_cpu) for name, statement in SCENARIOS.items()
    }
    print(json.dumps({"python": sys.version.split()[0], "repeats": repeats, "results": results}, indent=2))
    print(f"\n{'scenario':<30} {'import ms':>10} {'best':>7} {'cpu ms':>7} {'modules':>8}  heavy parts")
    for name, result in results.items():
        heavy = ", ".join(result["heavy_loaded"]) or "-"  # type: ignore[arg-type]
        print(
            f"{name:<30} {result['import_median_ms']:>10} {result['import_best_ms']:>7} "
            f"{result['cpu_median_ms']:>7} {result['modules']:>8}  {heavy}"
        )


if __name__ == "__main__":
    main()
