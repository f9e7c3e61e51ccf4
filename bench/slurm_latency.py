"""Slurm launch latency: Enqueue sent -> first line of the job's code, beside Slurm's own submit -> start.

Needs a Slurm cluster whose nodes share this host's filesystem (the one-node cluster of
``.ci/slurm-setup.sh``). Starts a local stack and an agent with the slurm runner in a temporary
TAKEOFF_HOME (the runner's ``shared_roots``: that home, the Takeoff code and its venv), warms the build
cache with one launch, then ``--launches`` times, one after another:

- a bare ``sbatch --parsable --wrap`` job that writes the time its batch script started: Slurm's own
  submit -> start, sbatch's command included; and one whose first command is a Python printing the time
  (the interpreter's start, which a launch's job pays too);
- a Takeoff launch of a cached code job whose first statement prints the time: Enqueue sent -> LEASED
  (dispatch) -> STARTING (the cached build, the run created) -> the first line (sbatch, Slurm's submit ->
  start, the shim and the job's interpreter starting).

The difference of the p50s (the launch's and the bare Python's) is what Takeoff adds (goal: <= 100 ms).
Clocks are this host's, so the figures are comparable on a one-node cluster only.

    python bench/slurm_latency.py [--launches 20] [--partition debug]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import takeoff_agent
from takeoff.client import Client
from takeoff.models import Item, ItemState, ResourceKind
from takeoff.stack import LocalStack

FIRST_LINE = "first line at "
JOB = f"""\
import time; print("{FIRST_LINE}" + repr(time.time()), flush=True)
import takeoff
takeoff.init().finish()
"""
SBATCH = "sbatch submit -> start"
SBATCH_PYTHON = "sbatch -> python line"
BARE_COMMANDS = {
    SBATCH: "date +%s.%N",
    SBATCH_PYTHON: f"{sys.executable} -c 'import time; print(time.time())'",
}
"""The bare jobs: a shell's first command, and a Python's first line (the interpreter's start counted, as in
a launch)."""
TAKEOFF = "enqueue -> first line"
START_TIMEOUT_SECONDS = 600


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9 + 0.5) - 1)], 1),
        "min_ms": round(ordered[0], 1),
        "max_ms": round(ordered[-1], 1),
    }


def _reached(item: Item, state: ItemState) -> float:
    for transition in item.transitions:
        if transition.to_state is state and transition.time is not None:
            return transition.time.timestamp()
    raise RuntimeError(f"{item.name} never reached {state}")


def _bare_sbatch(directory: Path, partition: str, stamp_command: str) -> float:
    """Milliseconds from sbatch's start to the time ``stamp_command`` prints in a bare batch job."""
    stamp = directory / f"stamp-{time.monotonic_ns()}"
    sent = time.time()
    subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--partition={partition}",
            "--output=/dev/null",
            f"--wrap={stamp_command} > {stamp}",
        ],
        check=True,
        capture_output=True,
    )
    while not stamp.exists() or not stamp.read_text().strip():
        time.sleep(0.005)
    return (float(stamp.read_text()) - sent) * 1e3


def _wait_idle() -> None:
    """Until no job runs or completes on the cluster and its nodes are idle, so that each measured job
    finds the same cluster (a job submitted while another completes waits for a later scheduling pass)."""

    def busy() -> bool:
        jobs = subprocess.run(
            ["squeue", "--noheader", "--states=RUNNING,COMPLETING,PENDING", "--format=%i"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        nodes = subprocess.run(
            ["sinfo", "--noheader", "--format=%t"], check=True, capture_output=True, text=True
        ).stdout.split()
        return bool(jobs) or any(state != "idle" for state in nodes)

    while busy():
        time.sleep(0.05)


def _takeoff(client: Client, queue: str) -> dict[str, float]:
    """Milliseconds from Enqueue sent to the job's first line, and the steps between."""
    sent = time.time()
    item = client.get_item(client.launch("first-line", queue).wait(timeout=600).name)
    if item.state is not ItemState.SUCCEEDED:
        raise RuntimeError(f"a launch ended {item.state}: {item.message}")
    first_line = next(
        float(line.text.removeprefix(FIRST_LINE))
        for line in client.read_logs(item.run)
        if line.text.startswith(FIRST_LINE)
    )
    leased, starting = _reached(item, ItemState.LEASED), _reached(item, ItemState.STARTING)
    return {
        TAKEOFF: (first_line - sent) * 1e3,
        "-> LEASED": (leased - sent) * 1e3,
        "-> STARTING": (starting - leased) * 1e3,
        "-> first line": (first_line - starting) * 1e3,
        "RUNNING reported": (_reached(item, ItemState.RUNNING) - first_line) * 1e3,
    }


def _run(launches: int, partition: str) -> dict[str, list[float]]:
    # Under /tmp, which the one-node cluster's node sees as this host does.
    with tempfile.TemporaryDirectory(prefix="takeoff-slurm-bench-") as directory:
        home = Path(directory)
        code = home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        shared_roots = [str(home), str(Path(takeoff_agent.__file__).parents[2]), sys.prefix]
        stack = LocalStack(home, base_port=0)
        record = stack.start()
        try:
            registry, queue_service = record.services["registry"], record.services["queue"]
            with Client(
                registry.address, queue=queue_service.address, project="bench", api_key=stack.admin_key
            ) as client:
                client.create_job_version("first-line", code, entrypoint=["python", "main.py"])
                queue = client.create_queue(
                    "slurm",
                    resource=ResourceKind.SLURM,
                    resource_config={"partition": partition},
                    start_timeout=START_TIMEOUT_SECONDS,
                ).name
                config = home / "agent.yaml"
                runner = {"shared_roots": shared_roots, "poll_seconds": 0.2}
                config.write_text(
                    yaml.safe_dump({"queues": [queue], "max_jobs": 1, "runners": {"slurm": runner}})
                )
                stack.start_agent(config)
                _takeoff(client, queue)  # builds the venv
                figures: dict[str, list[float]] = {bare: [] for bare in BARE_COMMANDS}
                for _ in range(launches):  # interleaved, so all see the same load
                    for bare, command in BARE_COMMANDS.items():
                        _wait_idle()
                        figures[bare].append(_bare_sbatch(home, partition, command))
                    _wait_idle()
                    for span, value in _takeoff(client, queue).items():
                        figures.setdefault(span, []).append(value)
                return figures
        finally:
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--partition", default="debug")
    args = parser.parse_args()
    figures = {span: _summary(values) for span, values in _run(args.launches, args.partition).items()}
    added = round(figures[TAKEOFF]["p50_ms"] - figures[SBATCH_PYTHON]["p50_ms"], 1)
    print(json.dumps({"launches": args.launches, "takeoff_adds_p50_ms": added, **figures}, indent=2))
    columns = ("p50_ms", "p90_ms", "min_ms", "max_ms")
    print(f"\nslurm, {args.launches} launches; Takeoff adds {added} ms at p50")
    print(f"{'':>24} " + " ".join(f"{column:>9}" for column in columns))
    for span, summary in figures.items():
        print(f"{span:>24} " + " ".join(f"{summary[column]:>9}" for column in columns))


if __name__ == "__main__":
    main()
