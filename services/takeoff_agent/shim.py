"""The supervisor of one job: ``python -m takeoff_agent.shim LEASE_DIR``.

It outlives the agent (own session), so a job survives an agent restart, and leaves in LEASE_DIR all
an agent needs to take the job back or learn how it ended:

- ``spec.json`` (written by the agent): what to run. A local process: argv, env, cwd. A container
  (``"mode": "container"``): the container the agent created, the engine it is on;
- ``stdout.log``, ``stderr.log``: the job's output, appended as it comes (a container's, followed from
  the engine);
- ``shim.json``: the shim's pid and the job's pid (= its process group), or the container's id once the
  shim has started it (``"started": true``) or found it could not;
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
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
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


def run_container(lease_dir: Path, spec: dict[str, Any]) -> None:
    import docker  # only here: a local process's shim starts without the Docker client
    import requests

    with shim_lock(lease_dir) as only_shim:
        if not only_shim:
            return
        container = spec["container"]
        record = {"shim_pid": os.getpid(), "container": container}
        try:
            engine = engine_client(spec.get("docker_host"), timeout=ENGINE_CALL_SECONDS)
            # Waiting for the container and following its output last as long as the job: no read timeout.
            streams = engine_client(spec.get("docker_host"), timeout=None, version=engine.api_version)
            status = engine.inspect_container(container)["State"]["Status"]
        except (docker.errors.DockerException, requests.RequestException) as error:
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "shim.json", {**record, "started": False})
                write_atomically(lease_dir / "exit.json", engine_failure(error, "reach the job's container"))
            return

        def record_exit(ended: dict[str, Any]) -> None:
            with contextlib.suppress(docker.errors.APIError, requests.RequestException):
                engine.remove_container(container, v=True, force=True)
            # The agent may have forgotten the lease (revoked) and removed its directory by now.
            with contextlib.suppress(FileNotFoundError):
                write_atomically(lease_dir / "exit.json", {"fenced": False, "oom_killed": False, **ended})

        if status == "created":
            try:
                engine.start(container)
            except (docker.errors.APIError, requests.RequestException) as error:
                with contextlib.suppress(FileNotFoundError):
                    write_atomically(lease_dir / "shim.json", {**record, "started": False})
                record_exit(start_failure(error, lease_dir))
                return
        write_atomically(lease_dir / "shim.json", {**record, "started": True})
        followers = [
            threading.Thread(target=follow, args=(streams, container, name, lease_dir / f"{name}.log"))
            for name in ("stdout", "stderr")
        ]
        for follower in followers:
            follower.start()
        ended: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: ended.update(wait_container(streams, container)))
        waiter.start()
        grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
        fenced = False
        while waiter.is_alive():
            waiter.join(FENCE_CHECK_SECONDS)
            if waiter.is_alive() and (fenced or lease_lapsed(lease_dir)):
                fenced = True  # asked again until the engine has stopped it
                with contextlib.suppress(docker.errors.APIError, requests.RequestException):
                    engine.stop(container, timeout=math.ceil(grace))
        for follower in followers:
            follower.join(LOG_DRAIN_SECONDS)
        try:
            state = engine.inspect_container(container)["State"]
        except (docker.errors.APIError, requests.RequestException):
            state = {}
        if "failure" not in ended:
            exit_code = int(state.get("ExitCode", ended["exit_code"]))
            ended = {"exit_code": exit_code, "signal": signal_of(exit_code)}
        record_exit({**ended, "fenced": fenced, "oom_killed": bool(state.get("OOMKilled", False))})


def start_failure(error: Exception, lease_dir: Path) -> dict[str, Any]:
    """How a container the engine would not start ends: a command that cannot be executed is the job's
    (exit 127, as a shell says it); a setting the engine refuses is the config's; else the engine's."""
    import docker

    explanation = str(getattr(error, "explanation", None) or error)
    if isinstance(error, docker.errors.APIError) and any(
        marker in explanation.lower() for marker in _EXEC_FAILURES
    ):
        with (lease_dir / "stderr.log").open("ab") as stderr:
            stderr.write(f"takeoff: cannot start the container: {explanation}\n".encode())
        return {"exit_code": 127, "signal": None}
    refused = isinstance(error, docker.errors.APIError) and (
        error.is_client_error() or "unable to find user" in explanation
    )
    message = f"the Docker engine did not start the container: {explanation}"
    return {
        "exit_code": None,
        "signal": None,
        "failure": {"reason": "CONFIG_INVALID" if refused else "RUNNER_INFRA", "message": message},
    }


def follow(streams: Any, container: str, name: str, path: Path) -> None:
    """Append one output stream of the container to ``path`` as the engine hands it over (from the
    container's start: the engine keeps its output, so nothing printed before this call is lost)."""
    import requests

    with path.open("ab") as file, contextlib.suppress(requests.RequestException, OSError):
        for chunk in streams.logs(
            container, stdout=name == "stdout", stderr=name == "stderr", stream=True, follow=True
        ):
            file.write(chunk)
            file.flush()


def wait_container(streams: Any, container: str) -> dict[str, Any]:
    import docker
    import requests

    try:
        return {"exit_code": int(streams.wait(container)["StatusCode"])}
    except docker.errors.NotFound:  # removed under the shim (the agent swept it): killed
        return {"exit_code": 128 + signal.SIGKILL}
    except (docker.errors.APIError, requests.RequestException) as error:
        return engine_failure(error, "follow the job's container to its end")


def engine_failure(error: Exception, doing: str) -> dict[str, Any]:
    """An exit record for a job whose engine failed the shim: RUNNER_INFRA, retryable."""
    message = f"could not {doing} on the Docker engine: {getattr(error, 'explanation', None) or error}"
    return {
        "exit_code": None,
        "signal": None,
        "fenced": False,
        "oom_killed": False,
        "failure": {"reason": "RUNNER_INFRA", "message": message},
    }


def engine_options(docker_host: str | None) -> dict[str, Any]:
    """How to reach the engine at ``docker_host``, else the one ``DOCKER_HOST`` (or the local socket)
    names: keyword arguments of the docker SDK's clients."""
    import docker

    options: dict[str, Any] = docker.utils.kwargs_from_env()
    if docker_host:
        options["base_url"] = docker_host
    return options


def engine_client(docker_host: str | None, *, timeout: float | None, version: str = "auto") -> Any:
    import docker

    return docker.APIClient(version=version, timeout=timeout, **engine_options(docker_host))


def main(lease_dir: Path) -> int:
    spec = json.loads((lease_dir / "spec.json").read_text())
    if spec.get("mode") == "container":
        run_container(lease_dir, spec)
    else:
        run_process(lease_dir, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
