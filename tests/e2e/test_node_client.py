"""The Node.js example (examples/node), built from the protos alone, against a real registry and queue."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.conftest import require
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def npm_ci_unless_current(npm: str) -> None:
    """``npm ci``, unless node_modules was installed after the lock file last changed."""
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    manifests = (EXAMPLE / "package.json", EXAMPLE / "package-lock.json")
    if installed.exists() and installed.stat().st_mtime >= max(m.stat().st_mtime for m in manifests):
        return
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=EXAMPLE,
        capture_output=True,
        check=False,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    require("Node.js", node is not None and npm is not None, "apt-get install nodejs npm")
    assert node is not None
    assert npm is not None
    npm_ci_unless_current(npm)
    return node


@pytest.fixture
def stack(takeoff_home: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with service_process("registry", takeoff_home) as registry:
        env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address}
        with service_process("queue", takeoff_home, env=env) as queue:
            yield registry, queue


def test_node_client_enqueues_watches_and_decodes_error_details(
    node: str, stack: tuple[ServiceProcess, ServiceProcess]
) -> None:
    registry, queue = stack
    addresses = {"TAKEOFF_REGISTRY_ADDRESS": registry.address, "TAKEOFF_QUEUE_ADDRESS": queue.address}

    result = subprocess.run(
        [node, "client.js", "--project", "polyglot"],
        cwd=EXAMPLE,
        env={**os.environ, **addresses},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert ADMIN_KEY not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert 'job version: projects/polyglot/jobs/hello-node/versions/0 (version "0")' in lines
    # A Struct in and out: the schema's default for epochs was filled in.
    [run_config] = [line.split(": ", 1)[1] for line in lines if line.startswith("  run config")]
    assert json.loads(run_config) == {"lr": 0.05, "epochs": 3}
    [enqueued] = [line.split() for line in lines if line.startswith("item: ")]
    assert enqueued[2] == "ITEM_STATE_PENDING"
    watched = lines[lines.index("watch: ITEM_STATE_PENDING") :]
    assert watched[1:3] == [
        "transition: ITEM_STATE_PENDING -> ITEM_STATE_CANCELLED (cancelled by the Node.js example)",
        "ended: ITEM_STATE_CANCELLED",
    ]
    assert watched[3] == "error: INVALID_ARGUMENT CONFIG_INVALID (domain takeoff.dev)"
    violations = dict(re.findall(r"^  field (\S+): (.+)$", "\n".join(watched[4:]), re.MULTILINE))
    assert violations.keys() == {"run_config.lr", "max_attempts"}
    assert "number" in violations["run_config.lr"]

    with grpc.insecure_channel(queue.address) as channel:
        stored = queue_pb2_grpc.QueueServiceStub(channel).GetItem(
            queue_pb2.GetItemRequest(name=enqueued[1]),
            timeout=10,
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
        )
    assert stored.item.state == common_pb2.ITEM_STATE_CANCELLED
    assert stored.item.priority == common_pb2.PRIORITY_HIGH
