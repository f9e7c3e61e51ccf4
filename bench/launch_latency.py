"""Launch latency: Enqueue sent -> first line of the job's code executed, for a cached job.

Starts a local stack and an agent in a temporary TAKEOFF_HOME, creates a code job whose first statement
prints the time, runs it once to warm the build cache (a venv for local-process, an image for
local-container), then launches it ``--launches`` times one after another and reports p50/p90 (goal: p50 <=
300 ms for local-process, <= 1 s for local-container). The job prints the time and the bench reads it back
from the run's log, so the figure holds however the runner passes environment and files to the job.

Where the time goes is shown from the item's recorded transitions (the queue's clock) and the first line
(the job's clock; the same host): Enqueue -> LEASED (dispatch), -> STARTING (the cached build), ->
RUNNING (the runner started the job), -> first line (the job's interpreter reached its code).

    python bench/launch_latency.py [--launches 20] [--resource local-container --base-image IMAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from takeoff.client import Client
from takeoff.models import Item, ItemState, ResourceKind
from takeoff.stack import LocalStack, docker_answers, docker_location, ensure_image

FIRST_LINE = "first line at "
JOB = f"""\
import time; print("{FIRST_LINE}" + repr(time.time()), flush=True)
import takeoff
takeoff.init().finish()
"""
PHASES = (ItemState.LEASED, ItemState.STARTING, ItemState.RUNNING)
TOTAL = "enqueue -> line"


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[max(0, int(len(ordered) * fraction + 0.5) - 1)]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(_percentile(ordered, 0.9), 1),
        "min_ms": round(ordered[0], 1),
        "max_ms": round(ordered[-1], 1),
    }


def _phase_times(item: Item) -> dict[ItemState, datetime]:
    """When the item of the latest attempt first reached each state."""
    reached: dict[ItemState, datetime] = {}
    for transition in item.transitions:
        if transition.time is not None:
            reached.setdefault(transition.to_state, transition.time)
    return reached


def _first_line_time(client: Client, run: str) -> float:
    for line in client.read_logs(run):
        if line.text.startswith(FIRST_LINE):
            return float(line.text.removeprefix(FIRST_LINE))
    raise RuntimeError(f"run {run} has no line starting {FIRST_LINE!r}")


def _measure(client: Client, queue: str, launches: int) -> dict[str, list[float]]:
    """Launch the job ``launches`` times after one untimed launch that builds; milliseconds per phase."""
    spans: dict[str, list[float]] = {TOTAL: []}
    for launch in range(launches + 1):
        sent = time.time()
        item = client.get_item(client.launch("first-line", queue).wait(timeout=600).name)
        if item.state is not ItemState.SUCCEEDED:
            raise RuntimeError(f"launch {launch} ended {item.state}: {item.message}")
        if not launch:
            continue
        first_line = _first_line_time(client, item.run)
        spans[TOTAL].append((first_line - sent) * 1e3)
        reached = _phase_times(item)
        previous = sent
        for state in PHASES:
            at = reached[state].timestamp()
            spans.setdefault(f"-> {state.value}", []).append((at - previous) * 1e3)
            previous = at
        spans.setdefault("-> first line", []).append((first_line - previous) * 1e3)
    return spans


def _run(resource: ResourceKind, base_image: str | None, launches: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as directory:
        home = Path(directory)
        code = home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        stack = LocalStack(home, base_port=0, base_image=base_image)
        record = stack.start()
        try:
            registry, queue_service = record.services["registry"], record.services["queue"]
            with Client(registry.address, queue=queue_service.address, project="bench") as client:
                client.create_job_version("first-line", code, entrypoint=["python", "main.py"])
                queue = client.create_queue("launch", resource=resource).name
                config = home / "agent.yaml"
                config.write_text(yaml.safe_dump({"queues": [queue], "max_jobs": 1}))
                stack.start_agent(config)  # it refuses to start when it has no runner for the queue
                return _measure(client, queue, launches)
        finally:
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument(
        "--resource",
        choices=[ResourceKind.LOCAL_PROCESS.value, ResourceKind.LOCAL_CONTAINER.value],
        default=ResourceKind.LOCAL_PROCESS.value,
    )
    parser.add_argument(
        "--base-image",
        default=os.environ.get("TAKEOFF_DEFAULT_BASE_IMAGE", "python:3.12-slim"),
        help="local-container: the image the job's image is built on (python3 with venv)",
    )
    args = parser.parse_args()
    resource = ResourceKind(args.resource)
    base_image = None
    if resource is ResourceKind.LOCAL_CONTAINER:
        if not docker_answers():
            raise SystemExit(f"no Docker engine answers at {docker_location()}")
        ensure_image(args.base_image)
        base_image = args.base_image
    figures = {span: _summary(values) for span, values in _run(resource, base_image, args.launches).items()}
    print(json.dumps({"resource": resource.value, "launches": args.launches, **figures}, indent=2))
    columns = ("p50_ms", "p90_ms", "min_ms", "max_ms")
    print(f"\n{resource.value}, {args.launches} launches")
    print(f"{'':>16} " + " ".join(f"{column:>9}" for column in columns))
    for span, summary in figures.items():
        print(f"{span:>16} " + " ".join(f"{summary[column]:>9}" for column in columns))


if __name__ == "__main__":
    main()
