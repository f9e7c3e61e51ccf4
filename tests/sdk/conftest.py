"""A real registry and queue on loopback for the SDK, client and CLI tests, and jobs run as subprocesses."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff import Client
from tests.processes import ServiceProcess, service_process


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with service_process("registry", tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="session")
def queue_service(
    registry: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A real queue service, resolving jobs through the session's registry."""
    env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address, "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1"}
    with service_process("queue", tmp_path_factory.mktemp("queue"), env=env) as server:
        yield server


@pytest.fixture
def project() -> str:
    """A fresh project per test, so tests sharing the registry never see each other's jobs and runs."""
    return f"sdk-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(registry: ServiceProcess, project: str) -> Iterator[Client]:
    with Client(registry.address, project=project) as client:
        yield client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def job_environment(registry_address: str, project: str, **extra: str) -> dict[str, str]:
    """The environment of a job process: this one's, minus any Takeoff settings, plus the given ones."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("TAKEOFF_")}
    return {**inherited, "TAKEOFF_REGISTRY": registry_address, "TAKEOFF_PROJECT": project, **extra}


_started_jobs: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _stop_leftover_jobs() -> Iterator[None]:
    """A test that fails early may leave a job waiting for its next step: never let it outlive the test."""
    yield
    while _started_jobs:
        job = _started_jobs.pop()
        if job.poll() is None:
            job.kill()
        job.communicate()


def start_job(tmp_path: Path, code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Run ``code`` as a job script in ``tmp_path``; its stdout and stderr are pipes."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(code))
    job = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    _started_jobs.append(job)
    return job


def run_job(
    tmp_path: Path, code: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    process = start_job(tmp_path, code, env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class ReplyDroppingProxy:
    """A TCP proxy in front of the registry that can lose replies, as a flaky network does.

    While replies are withheld, requests still reach the registry (which stores them) but nothing comes
    back; cutting the connections then fails the caller's call. A retry must not store the data twice.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._replies_flow = threading.Event()
        self._replies_flow.set()
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def withhold_replies(self) -> None:
        self._replies_flow.clear()

    def cut_connections(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self._connections.clear()
        self._replies_flow.set()

    def close(self) -> None:
        self._listener.close()
        self.cut_connections()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target)
                self._connections += [client, server]
                threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
                threading.Thread(
                    target=self._pipe, args=(server, client, self._replies_flow), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, destination: socket.socket, gate: threading.Event | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if gate is None or gate.is_set():
                    destination.sendall(data)


@pytest.fixture
def flaky_registry(registry: ServiceProcess) -> Iterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(registry.address)
    yield proxy
    proxy.close()
