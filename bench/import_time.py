"""What importing the SDK costs a process: every job pays ``import takeoff``, every service imports stubs.

Each scenario runs in a fresh ``python -X importtime -c STATEMENT`` several times. Its cost is the sum of
the "self" times of the modules it imports beyond those a bare interpreter (``-c pass``) imports at start,
so interpreter start-up is left out. Prints the median and the best of the repeats, the number of modules
the statement imports, and which of the SDK's heavy parts (client, run machinery, CLI, rich, typer) it
loaded.

    python bench/import_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SCENARIOS = {
    "import takeoff": "import takeoff",
    "import takeoff.v1.queue_pb2": "import takeoff.v1.queue_pb2",
    "import takeoff; takeoff.init": "import takeoff; takeoff.init",
}
HEAVY_MODULES = ("takeoff.client", "takeoff._run", "takeoff.cli", "rich", "typer")


def _imports(statement: str) -> dict[str, int]:
    """Module name -> its own import time in microseconds, for one fresh interpreter."""
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    timings: dict[str, int] = {}
    for line in finished.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        timings[name.strip()] = int(self_us)
    return timings


def measure(statement: str, repeats: int, baseline: set[str]) -> dict[str, object]:
    totals_ms, modules = [], set()
    for _ in range(repeats):
        imported = {name: us for name, us in _imports(statement).items() if name not in baseline}
        totals_ms.append(sum(imported.values()) / 1000)
        modules = set(imported)
    return {
        "median_ms": round(statistics.median(totals_ms), 1),
        "best_ms": round(min(totals_ms), 1),
        "modules": len(modules),
        "heavy_loaded": [heavy for heavy in HEAVY_MODULES if heavy in modules],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats
    baseline = set(_imports("pass"))
    results = {name: measure(statement, repeats, baseline) for name, statement in SCENARIOS.items()}
    print(json.dumps({"python": sys.version.split()[0], "repeats": repeats, "results": results}, indent=2))
    print(f"\n{'scenario':<32} {'median ms':>10} {'best ms':>8} {'modules':>8}  heavy parts loaded")
    for name, result in results.items():
        heavy = ", ".join(result["heavy_loaded"]) or "-"  # type: ignore[arg-type]
        print(f"{name:<32} {result['median_ms']:>10} {result['best_ms']:>8} {result['modules']:>8}  {heavy}")


if __name__ == "__main__":
    main()
