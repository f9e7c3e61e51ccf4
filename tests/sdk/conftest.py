"""A real registry and queue on loopback for the SDK, client and CLI tests, and jobs run as subprocesses."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import pytest
from google.protobuf import descriptor_pool

from takeoff import Client
from tests.keys import ADMIN_KEY
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


@pytest.fixture
def cli_env(registry: ServiceProcess, queue_service: ServiceProcess, project: str) -> dict[str, str]:
    """The environment of a ``takeoff`` command run against the session's registry and queue, on a wide
    terminal unless a test narrows it."""
    return {
        **job_environment(registry.address, project, TAKEOFF_QUEUE_ADDRESS=queue_service.address),
        "COLUMNS": "200",
    }


Takeoff = Callable[..., subprocess.CompletedProcess[str]]
"""``takeoff(*args)``: the command line run as a subprocess against the session's registry and queue."""


@pytest.fixture
def takeoff(cli_env: dict[str, str]) -> Takeoff:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "takeoff.cli", *args],
            env=cli_env,
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
        )

    return run


async def start_takeoff(cli_env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """The command line started as a subprocess whose output the test reads as it comes."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "takeoff.cli",
        *args,
        env=cli_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_a_connection_attempt(port: int, timeout: float = 30) -> None:
    """Stand in for a service that is away from ``port`` until a client tries to connect to it, which
    proves the client was trying to reach the service while it was away; the attempt then fails."""
    with socket.create_server(("127.0.0.1", port)) as stand_in:
        stand_in.settimeout(timeout)
        connection, _ = stand_in.accept()
        connection.close()


def job_environment(registry_address: str, project: str, **extra: str) -> dict[str, str]:
    """The environment of a job process: this one's, minus any Takeoff settings, plus the given ones and
    the session's admin key as the job's TAKEOFF_TOKEN (where a launched job finds its run token)."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("TAKEOFF_")}
    return {
        **inherited,
        "TAKEOFF_REGISTRY": registry_address,
        "TAKEOFF_PROJECT": project,
        "TAKEOFF_TOKEN": ADMIN_KEY,
        **extra,
    }


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
    """Run ``code`` as a job script in ``tmp_path``; its stdout is a pipe, its stderr goes to a file that a
    test can watch while the job runs (:func:`job_stderr`)."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(code))
    with (tmp_path / "job.stderr").open("w") as stderr:
        job = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=tmp_path,
        )
    _started_jobs.append(job)
    return job


def job_stderr(tmp_path: Path) -> str:
    """What the job started in ``tmp_path`` has written to stderr so far."""
    return (tmp_path / "job.stderr").read_text()


def run_job(
    tmp_path: Path, code: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    process = start_job(tmp_path, code, env)
    stdout, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, job_stderr(tmp_path))


class ReplyLosingProxy(grpc.GenericRpcHandler):
    """A gRPC proxy on loopback that passes every call on to ``target`` and can lose chosen replies, as a
    network does that drops the connection after the request went through: the service receives the call
    and acts on it, and the caller gets UNAVAILABLE instead of the reply. It keeps every request it passed
    on, by method, so a test can show that the caller sent a lost call again.
    """

    def __init__(self, target: str) -> None:
        self._upstream = grpc.insecure_channel(target)
        self._lock = threading.Lock()
        self._replies_to_lose: dict[str, int] = {}
        self.requests: dict[str, list[bytes]] = defaultdict(list)
        """Request messages passed on, serialised, by method name (``Service/Method``)."""
        self.lost: dict[str, list[bytes]] = defaultdict(list)
        """The requests whose replies were lost, by method name."""
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8), handlers=[self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def lose_next_reply(self, method: str) -> None:
        """Lose the reply to the next call of ``method`` (``Service/Method``: ``RunService/AttachRun``)."""
        with self._lock:
            self._replies_to_lose[method] = self._replies_to_lose.get(method, 0) + 1

    def close(self) -> None:
        self._server.stop(grace=None)
        self._upstream.close()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path = handler_call_details.method  # /takeoff.v1.RunService/AttachRun
        descriptor = descriptor_pool.Default().FindMethodByName(path.strip("/").replace("/", "."))
        if descriptor.client_streaming:
            return None  # UNIMPLEMENTED: no test sends a request stream through this proxy
        if descriptor.server_streaming:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._pass_stream, path))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._pass_unary, path))

    def _pass_unary(self, path: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        method = self._record(path, request)
        try:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._upstream.unary_unary(path)
            reply = call(request, **self._call_options(context))
        except grpc.RpcError as error:
            self._fail_like(context, error)
        with self._lock:
            lose = self._replies_to_lose.get(method, 0) > 0
            if lose:
                self._replies_to_lose[method] -= 1
                self.lost[method].append(request)
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the test's proxy lost the reply")
        return reply

    def _pass_stream(self, path: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record(path, request)
        try:
            call: grpc.UnaryStreamMultiCallable[bytes, bytes] = self._upstream.unary_stream(path)
            yield from call(request, **self._call_options(context))
        except grpc.RpcError as error:
            self._fail_like(context, error)

    def _record(self, path: str, request: bytes) -> str:
        method = path.rsplit(".", 1)[-1]  # RunService/AttachRun
        with self._lock:
            self.requests[method].append(request)
        return method

    @staticmethod
    def _call_options(context: grpc.ServicerContext) -> dict[str, Any]:
        metadata = [
            (key, value)
            for key, value in context.invocation_metadata()
            if not key.startswith(("grpc-", ":")) and key != "user-agent"
        ]
        return {"metadata": metadata, "timeout": context.time_remaining(), "wait_for_ready": True}

    @staticmethod
    def _fail_like(context: grpc.ServicerContext, error: grpc.RpcError) -> NoReturn:
        """Answer with the service's own status, details and trailing metadata (its ErrorInfo)."""
        call = cast(grpc.Call, error)  # what grpc raises is both
        context.set_trailing_metadata(call.trailing_metadata() or ())
        context.abort(call.code(), call.details() or "")


@pytest.fixture
def lossy_registry(registry: ServiceProcess) -> Iterator[ReplyLosingProxy]:
    proxy = ReplyLosingProxy(registry.address)
    yield proxy
    proxy.close()
