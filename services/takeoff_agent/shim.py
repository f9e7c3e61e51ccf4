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
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FENCE_CHECK_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0
SHIM_LOCK = "shim.lock"
"""Held (flock) by the shim of a container for as long as it lives: one shim per job, and a sign of life
that a reused pid cannot fake."""


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
    # A job's end is the end of every process it started, as a container's is: nothing of it may run on
    # unsupervised once its exit is recorded. The leader is reaped, so the group is only what is left.
    stop_group(job.pid, grace)
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


def main(lease_dir: Path) -> int:
    spec = json.loads((lease_dir / "spec.json").read_text())
    if spec.get("mode") == "container":
        from takeoff_agent.container_shim import run_container  # its HTTP client would slow every local start

        run_container(lease_dir, spec)
    else:
        run_process(lease_dir, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
