"""A real Ray head on loopback, started once per session from its own virtualenv (``TAKEOFF_TEST_RAY``, set by
.ci/ray-setup.sh): the `ray` marker's component.

Only tests/ray/test_ray_runner.py uses it, and ``--dist loadfile`` keeps a file on one worker, so one head
starts. It runs as ``ray start --head --block`` in a process group of its own, and is stopped through that
process (which ends what it started), not with ``ray stop``, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# The services and agents of the agent tests, as fixtures here too.
from tests.agent.conftest import (  # noqa: F401
    builder,
    client,
    home,
    lease_ttl_seconds,
    queue_database_url,
    queue_service,
    registry,
    stack,
    start_agent,
)
from tests.conftest import require
from tests.processes import wait_for

SLOT_RESOURCE = "takeoff_test_slot"
"""A custom resource the head has one of: a job asking for it holds it, a second waits (pending)."""
HEAD_ENVIRONMENT = ("PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR")
"""What the head gets of the tests' environment: not their keys (TAKEOFF_API_KEY), which its jobs would
inherit."""


@dataclass(frozen=True)
class RayCluster:
    address: str
    """The dashboard's URL (the Jobs API)."""
    temp_dir: Path

    def job(self, submission_id: str) -> dict[str, Any]:
        """The job's details as the Jobs API gives them."""
        response = httpx.get(f"{self.address}/api/jobs/{submission_id}", timeout=10)
        response.raise_for_status()
        details: dict[str, Any] = response.json()
        return details


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _serving(address: str) -> bool:
    try:
        return httpx.get(f"{address}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _warm_up(address: str) -> None:
    """Until the head takes jobs (its job agent registers after the dashboard serves: "No available agent
    to submit job"), and one has run, so that the first test's job does not wait for Ray's first worker."""

    def submitted() -> bool:
        body = {"entrypoint": "true", "submission_id": "warm-up"}
        return httpx.post(f"{address}/api/jobs/", json=body, timeout=30).status_code == 200

    def succeeded() -> bool:
        status: str = httpx.get(f"{address}/api/jobs/warm-up", timeout=10).json()["status"]
        assert status in ("PENDING", "RUNNING", "SUCCEEDED"), f"the warm-up job is {status}"
        return status == "SUCCEEDED"

    wait_for(submitted, timeout=60, what="the Ray head to take jobs")
    wait_for(succeeded, timeout=30, what="the warm-up job to succeed")
    httpx.delete(f"{address}/api/jobs/warm-up", timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    ray = os.environ.get("TAKEOFF_TEST_RAY", "")
    require("Ray", bool(ray) and Path(ray).exists(), "set TAKEOFF_TEST_RAY (run .ci/ray-setup.sh)")
    # Ray's session paths end up in Unix socket names (at most 107 bytes): a short directory of its own.
    temp_dir = Path(subprocess.check_output(["mktemp", "-d", "/tmp/tkray.XXXX"], text=True).strip())
    dashboard = _free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # Ports of their own, not Ray's fixed defaults: another Ray on the machine must not clash.
            *(
                f"--{option}={_free_port()}"
                for option in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                    "ray-client-server-port",
                )
            ),
            "--num-cpus=2",
            f'--resources={{"{SLOT_RESOURCE}": 1}}',
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env={
            **{name: value for name, value in os.environ.items() if name in HEAD_ENVIRONMENT},
            "RAY_USAGE_STATS_ENABLED": "0",
        },
        cwd=temp_dir,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:

        def serving() -> bool:
            if head.poll() is not None:
                raise AssertionError(f"the Ray head exited with {head.returncode}: {log.read_text()[-3000:]}")
            return _serving(address)

        wait_for(serving, timeout=120, what="the Ray head's dashboard to serve")
        _warm_up(address)
        yield RayCluster(address, temp_dir)
    finally:
        head.send_signal(signal.SIGTERM)  # ``--block`` ends every process it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
