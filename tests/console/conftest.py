"""A registry, a queue service and a console started as processes, for the console's own tests."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from takeoff.stack import write_secret_file
from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process, wait_for

PROJECT = "console"
QUEUE = f"projects/{PROJECT}/queues/main"
JOB = f"projects/{PROJECT}/jobs/train"
INPUTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "lr": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.1},
        "epochs": {"type": "integer", "minimum": 1, "default": 2},
    },
}


@dataclass
class Console:
    url: str
    port: int
    signin_code: str
    code_file: Path
    registry: str
    queue: str

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)


@pytest.fixture(scope="package")
def services(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServiceProcess, ServiceProcess, Path]]:
    home = tmp_path_factory.mktemp("console-services")
    with service_process("registry", home) as registry:
        queue_env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address}
        with service_process("queue", home, env=queue_env) as queue:
            _populate(registry.address, queue.address)
            yield registry, queue, home


def _populate(registry: str, queue: str) -> None:
    """A job whose inputs have bounds, and a local-container queue (no agent: items stay PENDING)."""
    with open_channel(registry, api_key=ADMIN_KEY) as channel:
        version = common_pb2.JobVersion(
            source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim")),
            entrypoint=["python", "-c", "pass"],
        )
        version.inputs.schema.update(INPUTS_SCHEMA)
        jobs_pb2_grpc.JobServiceStub(channel).CreateJobVersion(
            jobs_pb2.CreateJobVersionRequest(parent=JOB, version=version, allow_missing=True), timeout=30
        )
    with open_channel(queue, api_key=ADMIN_KEY) as channel:
        queue_pb2_grpc.QueueServiceStub(channel).CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=f"projects/{PROJECT}",
                queue_id="main",
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_CONTAINER),
            ),
            timeout=30,
        )


@pytest.fixture(scope="package")
def console(services: tuple[ServiceProcess, ServiceProcess, Path]) -> Iterator[Console]:
    """``python -m takeoff_console`` on a free port, with a one-time code and the admin key in its home."""
    registry, queue, home = services
    with console_process(home, registry.address, queue.address) as started:
        yield started


@contextmanager
def console_process(home: Path, registry: str, queue: str) -> Iterator[Console]:
    """A console in front of ``registry`` and ``queue``, its home ``home`` (which gets the admin key)."""
    write_secret_file(home / "keys" / "admin.key", ADMIN_KEY)
    code = secrets.token_urlsafe(32)
    code_file = home / "signin.code"
    write_secret_file(code_file, code)
    ready = home / "console.ready"
    ready.unlink(missing_ok=True)
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"TAKEOFF_API_KEY", "TAKEOFF_API_KEY_FILE", "TAKEOFF_TOKEN"}
    }
    log = home / "console.log"  # a file, not a pipe: a pipe nobody reads stalls the console at 64 KiB of logs
    with log.open("a") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "takeoff_console"],
            env={
                **environment,
                "TAKEOFF_HOME": str(home),
                "TAKEOFF_LISTEN": json.dumps(["127.0.0.1:0"]),
                "TAKEOFF_READY_FILE": str(ready),
                "TAKEOFF_REGISTRY_ADDRESS": registry,
                "TAKEOFF_QUEUE_ADDRESS": queue,
                "TAKEOFF_SIGNIN_CODE_FILE": str(code_file),
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:

        def started() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f"the console exited with {process.returncode}: {log.read_text()}")
            return str(json.loads(ready.read_text())["addresses"][0]) if ready.exists() else None

        address = wait_for(started, what="the console to serve")
        port = int(address.rpartition(":")[2])
        yield Console(f"http://{address}", port, code, code_file, registry, queue)
    finally:
        process.terminate()
        process.wait(timeout=30)


def project_key(registry: str, role: keys_pb2.ProjectRole.ValueType, project: str = PROJECT) -> str:
    """A new project key of ``role`` on ``project`` (the test project unless said)."""
    with open_channel(registry, api_key=ADMIN_KEY) as channel:
        created = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(
                key=keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[f"projects/{project}"], role=role)
            ),
            timeout=30,
        )
    return created.secret
