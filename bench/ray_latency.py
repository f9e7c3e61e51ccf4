"""Ray launch latency: Enqueue sent -> first line of the job's code, beside a direct Jobs API submit.

Starts a Ray head on loopback (``ray start --head --block`` from ``--ray``, default ``$TAKEOFF_TEST_RAY``:
the virtualenv of ``.ci/ray-setup.sh``), a local stack and an agent with the ray runner in a temporary
TAKEOFF_HOME (the runner's ``shared_roots``: that home and the agent's venv, which the head on this host
sees), warms the build cache and Ray's worker pool with one launch, then ``--launches`` times, one after
another:

- a direct submit (what ``JobSubmissionClient.submit_job`` sends: POST /api/jobs/) of an entrypoint that
  runs the job venv's Python printing the time: Ray's own submit -> first line, the interpreter's start
  included, as a launch pays it;
- a Takeoff launch of a cached code job whose first statement prints the time: Enqueue sent -> LEASED
  (dispatch) -> STARTING (the cached build, the run created) -> the first line (the code copied, the submit,
  Ray's supervisor actor, the fence's and the job's interpreters starting).

The difference of the p50s is what Takeoff adds (goal: <= 100 ms). Clocks are this host's.

    python bench/ray_latency.py [--launches 20] [--ray PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from takeoff.client import Client
from takeoff.models import Item, ItemState, ResourceKind
from takeoff.stack import LocalStack

FIRST_LINE = "first line at "
JOB = f"""\
import time; print("{FIRST_LINE}" + repr(time.time()), flush=True)
import takeoff
takeoff.init().finish()
"""
DIRECT = "direct submit -> line"
TAKEOFF = "enqueue -> first line"


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9 + 0.5) - 1)], 1),
        "min_ms": round(ordered[0], 1),
        "max_ms": round(ordered[-1], 1),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(probe: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def ray_head(ray: str, directory: Path) -> Iterator[str]:
    """A Ray head on loopback with ports of its own; its dashboard's URL once it takes jobs."""
    dashboard = _free_port()
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    head = subprocess.Popen(
        [
            ray,
            *("start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}"),
            *("--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2"),
            *(f"--{option}={_free_port()}" for option in ports),
            f"--temp-dir={directory}",
            "--disable-usage-stats",
        ],
        env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait(lambda: _submit(address, "true") is not None, "the Ray head to take jobs")
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # --block ends what it started
        head.wait(timeout=60)


def _submit(address: str, entrypoint: str) -> str | None:
    """POST /api/jobs/ as ``submit_job`` does; the submission id, or None if the head does not take it."""
    submission = f"bench-{uuid.uuid4().hex[:12]}"
    body = {"entrypoint": entrypoint, "submission_id": submission}
    try:
        answer = httpx.post(f"{address}/api/jobs/", json=body, timeout=30)
    except httpx.HTTPError:
        return None
    return submission if answer.status_code == 200 else None


def _direct(address: str, python: str) -> float:
    """Milliseconds from a direct submit to the first line of its Python."""
    sent = time.time()
    submission = _submit(address, f"{python} -c 'import time; print(\"{FIRST_LINE}\" + repr(time.time()))'")
    if submission is None:
        raise RuntimeError("the Ray head refused a direct submit")

    def ended() -> bool:
        status = httpx.get(f"{address}/api/jobs/{submission}", timeout=30).json()["status"]
        return status in ("SUCCEEDED", "FAILED", "STOPPED")

    _wait(ended, f"the direct job {submission} to end")
    logs = httpx.get(f"{address}/api/jobs/{submission}/logs", timeout=30).json()["logs"]
    line = next(line for line in logs.splitlines() if line.startswith(FIRST_LINE))
    return (float(line.removeprefix(FIRST_LINE)) - sent) * 1e3


def _reached(item: Item, state: ItemState) -> float:
    for transition in item.transitions:
        if transition.to_state is state and transition.time is not None:
            return transition.time.timestamp()
    raise RuntimeError(f"{item.name} never reached {state}")


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


def _run(launches: int, ray: str) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="takeoff-ray-bench-") as directory:
        home = Path(directory)
        code = home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        head_dir = home / "ray"
        head_dir.mkdir()
        with ray_head(ray, head_dir) as address:
            stack = LocalStack(home, base_port=0)
            record = stack.start()
            try:
                registry, queue_service = record.services["registry"], record.services["queue"]
                with Client(
                    registry.address, queue=queue_service.address, project="bench", api_key=stack.admin_key
                ) as client:
                    client.create_job_version("first-line", code, entrypoint=["python", "main.py"])
                    queue = client.create_queue("ray", resource=ResourceKind.RAY).name
                    config = home / "agent.yaml"
                    runner = {
                        "address": address,
                        "shared_roots": [str(home), sys.prefix],
                        "poll_seconds": 0.1,
                    }
                    settings = {
                        "queues": [queue],
                        "max_jobs": 1,
                        "runners": {"ray": runner},
                        "job_registry_address": registry.address,  # TCP: Ray jobs get no Unix socket
                    }
                    config.write_text(yaml.safe_dump(settings))
                    stack.start_agent(config)
                    _takeoff(client, queue)  # builds the venv, warms Ray's workers
                    python = str(next(home.glob("**/venvs/*/bin/python")))
                    figures: dict[str, list[float]] = {DIRECT: []}
                    for _ in range(launches):  # interleaved, so both see the same load
                        figures[DIRECT].append(_direct(address, python))
                        for span, value in _takeoff(client, queue).items():
                            figures.setdefault(span, []).append(value)
                    return figures
            finally:
                stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--ray", default=os.environ.get("TAKEOFF_TEST_RAY", ""), help="the `ray` command")
    args = parser.parse_args()
    if not args.ray:
        raise SystemExit("no Ray: pass --ray or set TAKEOFF_TEST_RAY (bash .ci/ray-setup.sh)")
    figures = {span: _summary(values) for span, values in _run(args.launches, args.ray).items()}
    added = round(figures[TAKEOFF]["p50_ms"] - figures[DIRECT]["p50_ms"], 1)
    print(json.dumps({"launches": args.launches, "takeoff_adds_p50_ms": added, **figures}, indent=2))
    columns = ("p50_ms", "p90_ms", "min_ms", "max_ms")
    print(f"\nray, {args.launches} launches; Takeoff adds {added} ms at p50")
    print(f"{'':>24} " + " ".join(f"{column:>9}" for column in columns))
    for span, summary in figures.items():
        print(f"{span:>24} " + " ".join(f"{summary[column]:>9}" for column in columns))


if __name__ == "__main__":
    main()
