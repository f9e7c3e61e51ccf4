"""The container mode of the shim (``shim.py``): start the container the agent created, copy its output
into the lease directory, fence it, and record how it ended.

It talks to the Docker Engine API over plain HTTP with the standard library: the docker SDK takes about
0.4 s to import, on the way of every container to its first line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from takeoff_agent.shim import (
    FENCE_CHECK_SECONDS,
    STOP_GRACE_SECONDS,
    lease_lapsed,
    shim_lock,
    write_atomically,
)

ENGINE_CALL_SECONDS = 60
LOG_DRAIN_SECONDS = 30
"""How long the shim waits, after a container ended, for the engine to hand over the rest of its output."""
_EXEC_FAILURES = ("executable file not found", "no such file or directory", "permission denied")


def signal_of(exit_code: int) -> int | None:
    """The signal a container's main process died of: the engine reports it as 128 + n, as shells do."""
    return exit_code - 128 if 128 < exit_code < 128 + signal.NSIG else None


class EngineError(Exception):
    """The engine answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def engine_address(docker_host: str | None) -> str:
    """``unix:///path`` or ``tcp://host:port`` of the engine at ``docker_host``, else of the one
    ``DOCKER_HOST`` (or the local socket) names. ValueError for an engine the shim cannot reach."""
    address = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not address.startswith(("unix://", "tcp://")):
        raise ValueError(f"{address!r}: the engine must be at unix:///path or tcp://host:port")
    if address.startswith("tcp://") and os.environ.get("DOCKER_TLS_VERIFY"):
        raise ValueError("an engine behind TLS (DOCKER_TLS_VERIFY) is not supported")
    return address


class Engine:
    """The few Docker Engine API calls the shim makes, over plain HTTP with the standard library: the
    docker SDK takes about 0.4 s to import, on the way of every container to its first line."""

    def __init__(self, docker_host: str | None) -> None:
        self.address = engine_address(docker_host)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.address.startswith("unix://"):
            return _UnixConnection(self.address.removeprefix("unix://"), timeout)
        host, _, port = self.address.removeprefix("tcp://").rstrip("/").rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    @contextlib.contextmanager
    def request(
        self, method: str, path: str, timeout: float | None = ENGINE_CALL_SECONDS, **query: object
    ) -> Iterator[http.client.HTTPResponse]:
        """The engine's answer; EngineError for an error status, OSError or HTTPException when the engine
        cannot be reached. ``timeout`` None: a call that lasts as long as the job."""
        connection = self._connection(timeout)
        try:
            connection.request(method, f"{path}?{urllib.parse.urlencode(query)}" if query else path)
            response = connection.getresponse()
            if response.status >= 400:
                body = response.read()
                try:
                    message = str(json.loads(body)["message"])
                except (ValueError, KeyError, TypeError):
                    message = body.decode(errors="replace").strip()
                raise EngineError(response.status, message or f"HTTP {response.status}")
            yield response
        finally:
            connection.close()

    def call(
        self, method: str, path: str, timeout: float | None = ENGINE_CALL_SECONDS, **query: object
    ) -> Any:
        with self.request(method, path, timeout, **query) as response:
            body = response.read()
        return json.loads(body) if body else None


ENGINE_FAILURES = (EngineError, OSError, http.client.HTTPException)


def run_container(lease_dir: Path, spec: dict[str, Any]) -> None:
    with shim_lock(lease_dir) as only_shim:
        if not only_shim:
            return
        container = spec["container"]
        path = f"/containers/{container}"
        record = {"shim_pid": os.getpid(), "container": container}
        try:
            engine = Engine(spec.get("docker_host"))
            status = engine.call("GET", f"{path}/json")["State"]["Status"]
        except (*ENGINE_FAILURES, ValueError) as error:
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "shim.json", {**record, "started": False})
                write_atomically(lease_dir / "exit.json", engine_failure(error, "reach the job's container"))
            return

        def record_exit(ended: dict[str, Any]) -> None:
            with contextlib.suppress(*ENGINE_FAILURES):
                engine.call("DELETE", path, force=1, v=1)
            # The agent may have forgotten the lease (revoked) and removed its directory by now.
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "exit.json", {"fenced": False, "oom_killed": False, **ended})

        if status == "created":
            try:
                engine.call("POST", f"{path}/start")
            except ENGINE_FAILURES as error:
                with contextlib.suppress(FileNotFoundError):
                    write_atomically(lease_dir / "shim.json", {**record, "started": False})
                record_exit(start_failure(error, lease_dir))
                return
        write_atomically(lease_dir / "shim.json", {**record, "started": True})
        taking_over = status != "created"  # from a shim that died: its logs hold what it copied
        followers = [
            threading.Thread(
                target=follow, args=(engine, path, stream, lease_dir / f"{stream}.log", taking_over)
            )
            for stream in ("stdout", "stderr")
        ]
        for follower in followers:
            follower.start()
        ended: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: ended.update(wait_container(engine, path)))
        waiter.start()
        grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
        fenced = False
        while waiter.is_alive():
            waiter.join(FENCE_CHECK_SECONDS)
            if waiter.is_alive() and (fenced or lease_lapsed(lease_dir)):
                fenced = True  # asked again until the engine has stopped it
                with contextlib.suppress(*ENGINE_FAILURES):
                    engine.call("POST", f"{path}/stop", ENGINE_CALL_SECONDS + grace, t=math.ceil(grace))
        for follower in followers:
            follower.join(LOG_DRAIN_SECONDS)
        try:
            state = engine.call("GET", f"{path}/json")["State"]
        except ENGINE_FAILURES:
            state = {}
        if "failure" not in ended:
            exit_code = int(state.get("ExitCode", ended["exit_code"]))
            ended = {"exit_code": exit_code, "signal": signal_of(exit_code)}
        record_exit({**ended, "fenced": fenced, "oom_killed": bool(state.get("OOMKilled", False))})


def start_failure(error: Exception, lease_dir: Path) -> dict[str, Any]:
    """How a container the engine would not start ends: a command that cannot be executed is the job's
    (exit 127, as a shell says it); a setting the engine refuses is the config's; else the engine's."""
    explanation = str(error)
    if isinstance(error, EngineError) and any(marker in explanation.lower() for marker in _EXEC_FAILURES):
        with (lease_dir / "stderr.log").open("ab") as stderr:
            stderr.write(f"takeoff: cannot start the container: {explanation}\n".encode())
        return {"exit_code": 127, "signal": None}
    refused = isinstance(error, EngineError) and (
        400 <= error.status < 500 or "unable to find user" in explanation
    )
    message = f"the Docker engine did not start the container: {explanation}"
    return {
        "exit_code": None,
        "signal": None,
        "failure": {"reason": "CONFIG_INVALID" if refused else "RUNNER_INFRA", "message": message},
    }


def follow(engine: Engine, path: str, stream: str, log: Path, taking_over: bool = False) -> None:
    """Append one output stream of the container to ``log`` as the engine hands it over (from the
    container's start: the engine keeps its output, so nothing printed before this call is lost). The
    engine sends frames: 8 bytes (stream, 0, 0, 0, length as 4 big-endian bytes), then the bytes.

    A shim ``taking_over`` a running container from one that died gets the stream from the start again, and
    skips as many bytes as the log already holds: what the dead shim copied, byte for byte the same."""
    with (
        log.open("ab") as file,
        contextlib.suppress(*ENGINE_FAILURES),
        engine.request("GET", f"{path}/logs", None, follow=1, **{stream: 1}) as response,
    ):
        copied = os.fstat(file.fileno()).st_size if taking_over else 0
        while len(header := response.read(8)) == 8:
            data = response.read(int.from_bytes(header[4:], "big"))
            if copied:
                skipped = min(copied, len(data))
                data, copied = data[skipped:], copied - skipped
            file.write(data)
            file.flush()


def wait_container(engine: Engine, path: str) -> dict[str, Any]:
    try:
        return {"exit_code": int(engine.call("POST", f"{path}/wait", None)["StatusCode"])}
    except EngineError as error:
        if error.status == 404:  # removed under the shim (the agent swept it): killed
            return {"exit_code": 128 + signal.SIGKILL}
        return engine_failure(error, "follow the job's container to its end")
    except ENGINE_FAILURES as error:
        return engine_failure(error, "follow the job's container to its end")


def engine_failure(error: Exception, doing: str) -> dict[str, Any]:
    """An exit record for a job whose engine failed the shim: RUNNER_INFRA, retryable."""
    return {
        "exit_code": None,
        "signal": None,
        "fenced": False,
        "oom_killed": False,
        "failure": {"reason": "RUNNER_INFRA", "message": f"could not {doing} on the Docker engine: {error}"},
    }
