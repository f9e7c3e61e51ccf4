"""The one-node Slurm cluster .ci/slurm-setup.sh starts (``TAKEOFF_TEST_SLURM=1``): the `slurm` marker's
component. The tests submit real batch jobs to it through real services and agents (the agent tests'
fixtures, imported below), with the agent's state and the builder's venvs under the test's temporary root
and the agent's interpreter in the repository: the runner's ``shared_roots``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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

REPOSITORY = Path(__file__).parents[2]


@dataclass(frozen=True)
class SlurmCluster:
    shared_roots: tuple[Path, ...]
    """What the tests' agents tell the runner the compute nodes see: the tests' temporary root (the agent's
    state, the builder's venvs and code) and the repository (the agent's code, and its venv, whose python
    runs the shim)."""

    def runner_options(self, **options: object) -> dict[str, object]:
        return {"shared_roots": [str(root) for root in self.shared_roots], "poll_seconds": 0.2, **options}

    def show_job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (``TimeLimit``, ``MinMemoryNode``, ``JobState``, ...)."""
        shown = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True, check=True
        ).stdout
        return dict(field.split("=", 1) for field in shown.split() if "=" in field)

    def jobs(self) -> list[dict[str, object]]:
        """Every job Slurm knows (``squeue --json --states=all``)."""
        shown = subprocess.run(
            ["squeue", "--json", "--states=all"], capture_output=True, text=True, check=True
        ).stdout
        jobs: list[dict[str, object]] = json.loads(shown)["jobs"]
        return jobs


USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}
"""``sinfo``'s short states of a node that takes jobs (``comp``: one is still being stopped); a suffix (``*``
not responding, ``~`` powered off, ...) makes it another state."""

NODE_PATIENCE_SECONDS = 60.0
"""How long the tests wait for the node to take jobs: a loaded machine's slurmd may answer late."""


def _node_states() -> str:
    """What ``sinfo`` says of the nodes, or why it cannot say; empty where the cluster is not set up."""
    if os.environ.get("TAKEOFF_TEST_SLURM") != "1" or shutil.which("sinfo") is None:
        return ""
    answer = subprocess.run(
        ["sinfo", "--noheader", "--format=%t"], check=False, capture_output=True, text=True
    )
    return answer.stdout if answer.returncode == 0 else answer.stderr


def _cluster_up() -> tuple[bool, str]:
    """Whether the node takes jobs, waiting for it a while, and what ``sinfo`` said last."""
    deadline = time.monotonic() + NODE_PATIENCE_SECONDS
    while True:
        states = _node_states()
        if USABLE_NODE_STATES & set(states.split()):
            return True, states
        if not states or time.monotonic() > deadline:
            return False, states
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    up, states = _cluster_up()
    require(
        "slurm",
        up,
        "run .ci/slurm-setup.sh as root (sets TAKEOFF_TEST_SLURM=1)"
        + (f"; sinfo says the node is {states.strip()!r}" if states else ""),
    )
    return SlurmCluster((tmp_path_factory.getbasetemp(), REPOSITORY))
