"""The supervisor of one job: ``python -m takeoff_agent.shim LEASE_DIR``.

It outlives the agent (own session), so a job survives an agent restart, and leaves in LEASE_DIR all
an agent needs to take the job back or learn how it ended:

- ``spec.json`` (written by the agent): what to run. A local process: argv, env, cwd. A container
  (``"mode": "container"``): the container the agent created, the engine it is on;
- ``stdout.log``, ``stderr.log``: the job's output, appended as it comes (a container's, followed from
  the engine);
- ``shim.json``: the shim's pid and the job's pid (= its process group), or the container's id once the
  shim has started it (``"started": true``) or found it could not;
- ``shim.lock``: held (``flock``) by a container's shim as long as it lives;
- ``exit.json``: how the job ended: exit code, or the signal that killed it, whether the shim stopped it
  because the agent's lease ran out, whether the kernel killed it for memory (a container's
  ``State.OOMKilled``), or a failure of the runner's own (written last, atomically).

Self-fencing: the agent writes the time its leases are good until to ``lease_until`` whenever it renews
them. If that time passes (the agent is dead or cut off from the queue), the shim stops the job: a lost
agent's job and the next attempt never run side by side for long. A container is stopped (SIGTERM,
grace, SIGKILL) and, like every container the shim owns once it has ended, removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FENCE_CHECK_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0
ENGINE_CALL_SECONDS = 60
LOG_DRAIN_SECONDS = 30
"""How long the shim waits, after a container ended, for the engine to hand over the rest of its output."""
SHIM_LOCK = "shim.lock"
"""Held (flock) by the shim of a container for as long as it lives: one shim per job, and a sign of life
that a reused pid cannot fake."""
_EXEC_FAILURES = ("executable file not found", "no such file or directory", "permission denied")


def write_atomically(path: Path, data: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def lease_until(lease_dir: Path) -> float | None:
    try:
        return float((lease_dir / "lease_until").read_text())
    except (OSError, ValueError):
        return None


def lease_lapsed(lease_dir: Path) -> bool:
    until = lease_until(lease_dir)
    return until is not None and time.time() > until


def stop_group(pgid: int, grace: float, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM the job's process group, then SIGKILL it if it is still there after ``grace``.

    ``reap`` collects the group's leader when the caller is its parent (the shim): a leader that has
    exited but is not reaped keeps its group alive to ``killpg(pgid, 0)``, which would hold the caller
    for the whole grace."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_process(lease_dir: Path, spec: dict[str, Any]) -> None:
    with (lease_dir / "stdout.log").open("ab") as stdout, (lease_dir / "stderr.log").open("ab") as stderr:
        try:
            job = subprocess.Popen(
                spec["argv"],
                cwd=spec["cwd"],
                env=spec["env"],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group: stopping it stops all it started
            )
        except OSError as error:
            stderr.write(f"takeoff: cannot start {spec['argv'][0]!r}: {error.strerror}\n".encode())
            write_atomically(lease_dir / "exit.json", {"exit_code": 127, "signal": None, "fenced": False})
            return
    write_atomically(lease_dir / "shim.json", {"shim_pid": os.getpid(), "job_pid": job.pid})
    grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
    fenced = False
    while True:
        try:
            returncode = job.wait(timeout=FENCE_CHECK_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if lease_lapsed(lease_dir) and not fenced:
                fenced = True
                stop_group(job.pid, grace, reap=job.poll)
    exit_code, killed_by = (returncode, None) if returncode >= 0 else (128 - returncode, -returncode)
    write_atomically(lease_dir / "exit.json", {"exit_code": exit_code, "signal": killed_by, "fenced": fenced})


@contextlib.contextmanager
def shim_lock(lease_dir: Path) -> Iterator[bool]:
    """Whether this process is the job's one shim (holding SHIM_LOCK until the block ends)."""
    with (lease_dir / SHIM_LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def shim_alive(lease_dir: Path) -> bool:
    """Whether a shim holds the lock of ``lease_dir`` (a container's shim)."""
    try:
        with (lease_dir / SHIM_LOCK).open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


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
        followers = [
            threading.Thread(target=follow, args=(engine, path, stream, lease_dir / f"{stream}.log"))
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


def follow(engine: Engine, path: str, stream: str, log: Path) -> None:
    """Append one output stream of the container to ``log`` as the engine hands it over (from the
    container's start: the engine keeps its output, so nothing printed before this call is lost). The
    engine sends frames: 8 bytes (stream, 0, 0, 0, length as 4 big-endian bytes), then the bytes."""
    with (
        log.open("ab") as file,
        contextlib.suppress(*ENGINE_FAILURES),
        engine.request("GET", f"{path}/logs", None, follow=1, **{stream: 1}) as response,
    ):
        while len(header := response.read(8)) == 8:
            file.write(response.read(int.from_bytes(header[4:], "big")))
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


def main(lease_dir: Path) -> int:
    spec = json.loads((lease_dir / "spec.json").read_text())
    if spec.get("mode") == "container":
        run_container(lease_dir, spec)
    else:
        run_process(lease_dir, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
