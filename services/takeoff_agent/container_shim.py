"""The container mode of the shim (``shim.py``): start the container the agent created (or the containers
of every rank of a multi-node launch), copy their output into the lease directory, fence them, and record
how the job ended.

One shim owns all ranks of an attempt: one lease deadline fences them all, one rank's failure stops the
others within a fence check, and one ``exit.json`` says how the attempt ended.

It talks to the Docker Engine API over plain HTTP with the standard library: the docker SDK takes about
0.4 s to import, on the way of every container to its first line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import queue
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
    output_files,
    shim_lock,
    until_fence_check,
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
    """Start the job's containers (every rank of a multi-node launch, ``spec["ranks"]``, rank 0 first: the
    others join its network), follow them to their end, and record it."""
    with shim_lock(lease_dir) as only_shim:
        if not only_shim:
            return
        containers: list[str] = spec.get("ranks") or [spec["container"]]
        paths = [f"/containers/{container}" for container in containers]
        ranks: list[int | None] = list(range(len(containers))) if "ranks" in spec else [None]
        record = {"shim_pid": os.getpid(), "container": containers[0]}
        try:
            engine = Engine(spec.get("docker_host"))
            statuses = [engine.call("GET", f"{path}/json")["State"]["Status"] for path in paths]
        except (*ENGINE_FAILURES, ValueError) as error:
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "shim.json", {**record, "started": False})
                write_atomically(lease_dir / "exit.json", engine_failure(error, "reach the job's container"))
            return

        def record_exit(ended: dict[str, Any]) -> None:
            for path in reversed(paths):  # the ranks in rank 0's network before rank 0
                with contextlib.suppress(*ENGINE_FAILURES):
                    engine.call("DELETE", path, force=1, v=1)
            # The agent may have forgotten the lease (revoked) and removed its directory by now.
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "exit.json", {"fenced": False, "oom_killed": False, **ended})

        running = start_ranks(engine, paths, statuses, [lease_dir / output_files(rank)[1] for rank in ranks])
        if isinstance(running, dict):
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "shim.json", {**record, "started": False})
            record_exit(running)
            return
        write_atomically(lease_dir / "shim.json", {**record, "started": True})
        # A container no longer new was started by a shim that died: its logs hold what that one copied.
        followers = [
            threading.Thread(target=follow, args=(engine, path, stream, lease_dir / log, status != "created"))
            for path, status, rank in zip(paths[:running], statuses, ranks, strict=False)
            for stream, log in zip(("stdout", "stderr"), output_files(rank), strict=True)
        ]
        for follower in followers:
            follower.start()
        grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
        ends, fenced = supervise(engine, paths[:running], lease_dir, grace)
        for follower in followers:
            follower.join(LOG_DRAIN_SECONDS)
        record_exit({**job_end(engine, paths, ends, multi="ranks" in spec), "fenced": fenced})


def start_ranks(
    engine: Engine, paths: list[str], statuses: list[str], stderr_logs: list[Path]
) -> int | dict[str, Any]:
    """Start every rank not started yet, in rank order: how many ranks run, or the exit record of a job
    that cannot start (the shim then removes every rank: all start, or none runs).

    A rank that cannot join rank 0's network because rank 0 has ended already (a job that fails at once)
    is not the engine's failure: the job runs as the ranks started so far, and ends as rank 0 did."""
    for rank, (path, status) in enumerate(zip(paths, statuses, strict=True)):
        if status != "created":
            continue
        try:
            engine.call("POST", f"{path}/start")
        except ENGINE_FAILURES as error:
            if rank and rank_ended(engine, paths[0]):
                with stderr_logs[rank].open("ab") as stderr:
                    stderr.write(f"takeoff: rank {rank} did not start: rank 0 had ended\n".encode())
                return rank
            return start_failure(error, stderr_logs[rank])
    return len(paths)


def rank_ended(engine: Engine, path: str) -> bool:
    """Whether the container at ``path`` has ended (False when the engine cannot say)."""
    with contextlib.suppress(*ENGINE_FAILURES):
        return engine.call("GET", f"{path}/json")["State"]["Status"] in ("exited", "dead")
    return False


def supervise(
    engine: Engine, paths: list[str], lease_dir: Path, grace: float
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """Wait for every container to end: each rank and its end as the engine reports it, in the order
    they ended, and whether the shim fenced them. The first rank to fail (or the lease lapsing) stops every
    other: one rank's failure is the attempt's, and nothing of it runs on unsupervised."""
    ended: queue.SimpleQueue[tuple[int, dict[str, Any]]] = queue.SimpleQueue()

    def wait(rank: int) -> None:
        ended.put((rank, wait_container(engine, paths[rank])))

    for rank in range(len(paths)):
        threading.Thread(target=wait, args=(rank,)).start()
    ends: list[tuple[int, dict[str, Any]]] = []
    stoppers: dict[int, threading.Thread] = {}
    stopping = fenced = False
    while len(ends) < len(paths):
        with contextlib.suppress(queue.Empty):
            rank, end = ended.get(timeout=FENCE_CHECK_SECONDS if fenced else until_fence_check(lease_dir))
            ends.append((rank, end))
            stopping = stopping or failed(end)
        if len(ends) < len(paths) and not fenced and lease_lapsed(lease_dir):
            stopping = fenced = True
        if stopping:  # asked again until the engine has stopped each
            done = {rank for rank, _ in ends}
            for rank, path in enumerate(paths):
                if rank not in done and not (rank in stoppers and stoppers[rank].is_alive()):
                    stoppers[rank] = threading.Thread(target=stop_container, args=(engine, path, grace))
                    stoppers[rank].start()
    return ends, fenced


def failed(end: dict[str, Any]) -> bool:
    """Whether a rank's end fails the job: an exit other than 0, or the engine lost it."""
    return "failure" in end or end["exit_code"] != 0


def stop_container(engine: Engine, path: str, grace: float) -> None:
    with contextlib.suppress(*ENGINE_FAILURES):
        engine.call("POST", f"{path}/stop", ENGINE_CALL_SECONDS + grace, t=math.ceil(grace))


def job_end(
    engine: Engine, paths: list[str], ends: list[tuple[int, dict[str, Any]]], *, multi: bool
) -> dict[str, Any]:
    """How the job ended: as the first rank that failed (named as ``rank`` in a multi-node launch), else
    as rank 0 (exit 0). A rank's exit code and OOM kill as the engine kept them."""
    failed_rank = next((rank for rank, end in ends if failed(end)), None)
    rank = failed_rank or 0
    end = dict(ends)[rank]
    try:
        state = engine.call("GET", f"{paths[rank]}/json")["State"]
    except ENGINE_FAILURES:
        state = {}
    if "failure" not in end:
        exit_code = int(state.get("ExitCode", end["exit_code"]))
        end = {"exit_code": exit_code, "signal": signal_of(exit_code)}
    named = {"rank": failed_rank} if multi and failed_rank is not None else {}
    return {**end, **named, "oom_killed": bool(state.get("OOMKilled", False))}


def start_failure(error: Exception, stderr_log: Path) -> dict[str, Any]:
    """How a container the engine would not start ends: a command that cannot be executed is the job's
    (exit 127, as a shell says it, in the container's ``stderr_log``); a setting the engine refuses is
    the config's; else the engine's."""
    explanation = str(error)
    if isinstance(error, EngineError) and any(marker in explanation.lower() for marker in _EXEC_FAILURES):
        with stderr_log.open("ab") as stderr:
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
