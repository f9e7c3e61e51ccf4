"""What importing the SDK costs a process: every job pays ``import takeoff`` and then what ``takeoff.init``
imports before its first call to the registry; every service imports the stubs.

Each scenario runs in a fresh interpreter that times only its statement, by the wall clock and by the
process's CPU time (which a busy machine disturbs less), so interpreter start-up is left out; a
scenario may first import, untimed, what it is measured beyond. Bytecode is
cached first, in a temporary ``PYTHONPYCACHEPREFIX``, as pip leaves it for an installed wheel: compiling
the sources would be measured otherwise. The scenarios take turns, repeat after repeat, so that a load
that comes and goes spreads over all of them. Prints each scenario's median and best wall time, median
CPU time, the modules it loads and which of the SDK's heavy parts among them; ``--top N`` adds the N
modules that cost it most (``-X importtime`` self times; a module loaded through ``importlib``, as
``takeoff``'s lazy names are, is not listed itself, only what it imports).

Goals (issue 13): ``import takeoff`` under 150 ms. Online, ``takeoff.init`` cannot do without gRPC and
the runs stubs (the floor scenario); what it loads beyond them (timed in one interpreter after them)
should add at most a third to that floor: a ratio, which a busy machine skews less than a number of
milliseconds (on a quiet one, about 50 ms). Offline and disabled runs load no gRPC.

    python bench/import_time.py [--repeats 9] [--top 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

IMPORT, INIT, FLOOR, BEYOND = (
    "import takeoff",
    "online init's imports",
    "floor: grpc + runs stubs",
    "online init beyond floor",
)
# An online run's init imports takeoff._online (gRPC, the channel, the sender) before its first call.
ONLINE_INIT = "import takeoff; takeoff.init; import takeoff._online"
FLOOR_IMPORTS = "import grpc; from takeoff.v1 import runs_pb2, runs_pb2_grpc"
SCENARIOS: dict[str, tuple[str, str]] = {
    # name: (imported first, untimed; the statement timed)
    IMPORT: ("", "import takeoff"),
    INIT: ("", ONLINE_INIT),
    FLOOR: ("", FLOOR_IMPORTS),
    BEYOND: (FLOOR_IMPORTS, ONLINE_INIT),
    "offline init's imports": ("", "import takeoff; takeoff.init; import takeoff._offline"),
    "init(mode='disabled')": ("", "import takeoff; takeoff.init(mode='disabled')"),
    "from takeoff import Client": ("", "from takeoff import Client"),
    "import takeoff.v1.queue_pb2": ("", "import takeoff.v1.queue_pb2"),
}
IMPORT_GOAL_MS = 150
BEYOND_FLOOR_GOAL = 1 / 3
HEAVY_PARTS = (
    "google.protobuf",
    "grpc",
    "takeoff._run",
    "takeoff.models",
    "takeoff.client",
    "takeoff.cli",
    "rich",
    "typer",
)

# Runs in the fresh interpreter: imports its second argument, then times its first and names the modules
# that loaded.
PROBE = """
import sys, time
exec(sys.argv[2])
before = set(sys.modules)
wall, cpu = time.perf_counter(), time.process_time()
exec(sys.argv[1])
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(wall * 1000, cpu * 1000, *(set(sys.modules) - before))
"""


@dataclass
class Result:
    wall_median_ms: float
    wall_best_ms: float
    cpu_median_ms: float
    modules: int
    heavy_parts: list[str]
    costliest_ms: list[str] = field(default_factory=list)


def probe(setup: str, statement: str, environment: dict[str, str]) -> tuple[float, float, set[str]]:
    """Wall and CPU milliseconds of ``statement`` in a fresh interpreter that ran ``setup`` first, and
    the modules ``statement`` loaded."""
    finished = subprocess.run(
        [sys.executable, "-c", PROBE, statement, setup],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    wall, cpu, *modules = finished.stdout.split()
    return float(wall), float(cpu), set(modules)


def costliest(
    setup: str, statement: str, environment: dict[str, str], modules: set[str], top: int
) -> list[str]:
    """The ``top`` of ``modules`` (those ``statement`` loads) with the largest import times of their own."""
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"{setup}\n{statement}"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    own: dict[str, int] = {}
    for line in finished.stderr.splitlines():
        if line.startswith("import time:") and "[us]" not in line:
            self_us, _cumulative, name = line.removeprefix("import time:").split("|")
            if name.strip() in modules:
                own[name.strip()] = int(self_us)
    ranked = sorted(own.items(), key=lambda item: item[1], reverse=True)[:top]
    return [f"{name} {us / 1000:.1f}" for name, us in ranked]


def measure(repeats: int, top: int) -> dict[str, Result]:
    with tempfile.TemporaryDirectory(prefix="takeoff-pycache-") as pycache:
        environment = {**os.environ, "PYTHONPYCACHEPREFIX": pycache}
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        for setup, statement in SCENARIOS.values():
            probe(setup, statement, environment)  # writes the bytecode cache
        samples: dict[str, list[tuple[float, float, set[str]]]] = {name: [] for name in SCENARIOS}
        for _ in range(repeats):
            for name, (setup, statement) in SCENARIOS.items():
                samples[name].append(probe(setup, statement, environment))
        results = {}
        for name, runs in samples.items():
            modules = runs[-1][2]
            results[name] = Result(
                wall_median_ms=round(statistics.median(wall for wall, _, _ in runs), 1),
                wall_best_ms=round(min(wall for wall, _, _ in runs), 1),
                cpu_median_ms=round(statistics.median(cpu for _, cpu, _ in runs), 1),
                modules=len(modules),
                heavy_parts=[part for part in HEAVY_PARTS if part in modules],
                costliest_ms=costliest(*SCENARIOS[name], environment, modules, top) if top else [],
            )
        return results


def report(results: dict[str, Result]) -> None:
    print(f"\n{'scenario':<28} {'wall ms':>8} {'best':>7} {'cpu ms':>7} {'modules':>8}  heavy parts")
    for name, result in results.items():
        print(
            f"{name:<28} {result.wall_median_ms:>8} {result.wall_best_ms:>7} {result.cpu_median_ms:>7} "
            f"{result.modules:>8}  {', '.join(result.heavy_parts) or '-'}"
        )
        for line in result.costliest_ms:
            print(f"{'':<30}{line}")
    floor, beyond = results[FLOOR].cpu_median_ms, results[BEYOND].cpu_median_ms
    print(f"\nimport takeoff: {results[IMPORT].cpu_median_ms:.0f} ms CPU (goal < {IMPORT_GOAL_MS} ms)")
    print(
        f"{BEYOND}: {beyond:.0f} ms CPU, {beyond / floor:.0%} of the floor (goal <= {BEYOND_FLOOR_GOAL:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--top", type=int, default=0, help="list each scenario's N costliest modules")
    arguments = parser.parse_args()
    results = measure(arguments.repeats, arguments.top)
    summary = {name: asdict(result) for name, result in results.items()}
    print(
        json.dumps(
            {"python": sys.version.split()[0], "repeats": arguments.repeats, "results": summary}, indent=2
        )
    )
    report(results)


if __name__ == "__main__":
    main()
