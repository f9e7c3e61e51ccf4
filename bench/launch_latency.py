"""Launch latency: Enqueue sent -> first line of the job's code executed, for a cached job.

Starts a local stack and an agent in a temporary TAKEOFF_HOME, creates a code job whose first statement
prints the time, runs it once to warm the build cache (a venv for local-process, an image for
local-container), then launches it ``--launches`` times one after another and reports p50/p90 (goal: p50 <=
50 ms for local-process on a quiet machine (issue 17), <= 1 s for local-container). The job prints the
time and the bench reads it back from the run's log, so the figure holds however the runner passes
environment and files to the job.

Where the time goes, launch by launch, from clocks on one host: Enqueue sent -> LEASED (dispatch) ->
STARTING (the cached build) -> for containers, the engine's ``create`` and ``start`` events of the job's
container (read back from the engine's event log by its ``takeoff.item`` label) -> the first line (the
job's interpreter reached its code). ``RUNNING reported`` is when the queue learnt the job runs, from the
first line (negative: before it).

    python bench/launch_latency.py [--launches 20] [--resource local-container --base-image IMAGE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
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
TOTAL = "enqueue -> line"
CONTAINER_EVENTS = ("create", "start")


@dataclass
class Launched:
    """One timed launch: UNIX times of what happened to it, in order."""

    item: str
    moments: dict[str, float]
    running: float


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


def _reached(item: Item, state: ItemState) -> float:
    """When the item first reached ``state``."""
    for transition in item.transitions:
        if transition.to_state is state and transition.time is not None:
            return transition.time.timestamp()
    raise RuntimeError(f"{item.name} never reached {state}")


def _first_line_time(client: Client, run: str) -> float:
    for line in client.read_logs(run):
        if line.text.startswith(FIRST_LINE):
            return float(line.text.removeprefix(FIRST_LINE))
    raise RuntimeError(f"run {run} has no line starting {FIRST_LINE!r}")


def _measure(client: Client, queue: str, launches: int) -> list[Launched]:
    """Launch the job ``launches`` times, one after another, after one untimed launch that builds."""
    timed = []
    for launch in range(launches + 1):
        sent = time.time()
        item = client.get_item(client.launch("first-line", queue).wait(timeout=600).name)
        if item.state is not ItemState.SUCCEEDED:
            raise RuntimeError(f"launch {launch} ended {item.state}: {item.message}")
        if launch:
            moments = {
                "enqueue": sent,
                "LEASED": _reached(item, ItemState.LEASED),
                "STARTING": _reached(item, ItemState.STARTING),
                "first line": _first_line_time(client, item.run),
            }
            timed.append(Launched(item.name, moments, _reached(item, ItemState.RUNNING)))
    return timed


def _add_container_events(timed: list[Launched]) -> None:
    """Put each launch's container ``create`` and ``start`` (the engine's clock) among its moments."""
    import docker

    by_item = {launch.item: launch for launch in timed}
    engine = docker.from_env()
    events = engine.events(
        since=int(min(launch.moments["enqueue"] for launch in timed)),
        until=int(time.time()) + 1,
        filters={"type": "container", "label": "takeoff.item"},
        decode=True,
    )
    for event in events:
        launch = by_item.get(event["Actor"]["Attributes"].get("takeoff.item", ""))
        if launch is not None and event["Action"] in CONTAINER_EVENTS:
            launch.moments.setdefault(f"container {event['Action']}", event["timeNano"] / 1e9)
    engine.close()


def _spans(timed: list[Launched]) -> dict[str, list[float]]:
    """Milliseconds from the enqueue to the first line, between consecutive moments, and from the first
    line to RUNNING reported."""
    spans: dict[str, list[float]] = {TOTAL: [], "RUNNING reported": []}
    for launch in timed:
        ordered = sorted(launch.moments.items(), key=lambda moment: moment[1])
        first_line = launch.moments["first line"]
        spans[TOTAL].append((first_line - launch.moments["enqueue"]) * 1e3)
        for (_, earlier), (name, later) in itertools.pairwise(ordered):
            spans.setdefault(f"-> {name}", []).append((later - earlier) * 1e3)
        spans["RUNNING reported"].append((launch.running - first_line) * 1e3)
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
            with Client(
                registry.address, queue=queue_service.address, project="bench", api_key=stack.admin_key
            ) as client:
                client.create_job_version("first-line", code, entrypoint=["python", "main.py"])
                queue = client.create_queue("launch", resource=resource).name
                config = home / "agent.yaml"
                config.write_text(yaml.safe_dump({"queues": [queue], "max_jobs": 1}))
                stack.start_agent(config)  # it refuses to start when it has no runner for the queue
                timed = _measure(client, queue, launches)
                if resource is ResourceKind.LOCAL_CONTAINER:
                    _add_container_events(timed)
                return _spans(timed)
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
    print(f"{'':>20} " + " ".join(f"{column:>9}" for column in columns))
    for span, summary in figures.items():
        print(f"{span:>20} " + " ".join(f"{summary[column]:>9}" for column in columns))


if __name__ == "__main__":
    main()
