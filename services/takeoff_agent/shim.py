"""The supervisor of one job: ``python -m takeoff_agent.shim LEASE_DIR``.

It outlives the agent (own session), so a job survives an agent restart, and leaves in LEASE_DIR all
an agent needs to take the job back or learn how it ended:

- ``spec.json`` (written by the agent): what to run. A local process: argv, env, cwd, and for a
  multi-node launch ``ranks``, each rank's variables over env (one process per rank, all on this host). A
  container (``"mode": "container"``): the container the agent created, the engine it is on;
- ``stdout.log``, ``stderr.log``: the job's output, appended as it comes (a container's, followed from
  the engine); ``stdout.rank{r}.log``, ``stderr.rank{r}.log`` for each rank of a multi-node launch;
- ``shim.json``: the shim's pid and the job's pid (= its process group; ``rank_pids``: one per rank), or
  the container's id once the shim has started it (``"started": true``) or found it could not;
- ``shim.lock``: held (``flock``) by a container's shim as long as it lives;
- ``exit.json``: how the job ended: exit code, or the signal that killed it, whether the shim stopped it
  because the agent's lease ran out, whether the kernel killed it for memory (a container's
  ``State.OOMKilled``), the rank that failed first in a multi-node launch (whose failure stops the other
  ranks), or a failure of the runner's own (written last, atomically).

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
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

FENCE_CHECK_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0
STOPPING = "stopping"
"""Written by the agent before it stops a local job (SIGTERM to each group, SIGKILL after the grace): the
shim, stopping what is left once a rank has ended of it, sends no second SIGTERM, which a job still
shutting down from the first (a checkpoint, the SDK's last delivery) may take as "die now"."""
SHIM_LOCK = "shim.lock"
"""Held (flock) by the shim of a container for as long as it lives: one shim per job, and a sign of life
that a reused pid cannot fake."""


def write_atomically(path: Path, data: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def write_private(path: Path, data: object) -> None:
    """``write_atomically``, readable by the agent's user only: the job's secrets are in it."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # a partial file left by a crash keeps its mode otherwise
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(data, file)
    partial.replace(path)


def lease_until(lease_dir: Path) -> float | None:
    try:
        return float((lease_dir / "lease_until").read_text())
    except (OSError, ValueError):
        return None


def lease_lapsed(lease_dir: Path) -> bool:
    until = lease_until(lease_dir)
    return until is not None and time.time() > until


def stop_groups(pgids: Collection[int], grace: float, *, terminated: bool = False) -> None:
    """SIGTERM the job's process groups (one per rank), then SIGKILL those still there after ``grace``;
    ``terminated``: they have had their SIGTERM (the agent's), only the SIGKILL is left to send. A group
    whose leader has exited is gone once the leader is reaped (the shim's waiting threads reap its own at
    once)."""
    alive = [pgid for pgid in pgids if _signal_group(pgid, 0 if terminated else signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pgid for pgid in alive if _signal_group(pgid, 0)]
    for pgid in alive:
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, signal_number: int) -> bool:
    """Send ``signal_number`` (0: none, a check) to a process group; whether the group was there."""
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        return False
    return True


def output_files(rank: int | None) -> tuple[str, str]:
    """Where in the lease directory the stdout and the stderr of a job go, or of one rank of a multi-node
    launch (a file per rank, so that each line keeps its rank and no rank's half line splits another's)."""
    label = "" if rank is None else f".rank{rank}"
    return f"stdout{label}.log", f"stderr{label}.log"


def start_ranks(lease_dir: Path, spec: dict[str, Any]) -> list[subprocess.Popen[bytes]]:
    """Start the job: one process, or one per rank of a multi-node launch (``spec["ranks"]``: each rank's
    variables over ``spec["env"]``), each in a process group of its own, so that stopping one stops all it
    started. All ranks start or none: if one cannot, those started are stopped and the exit recorded."""
    rank_envs: list[dict[str, str]] | None = spec.get("ranks")
    ranks: list[tuple[int | None, dict[str, str]]] = (
        [(None, {})] if rank_envs is None else list(enumerate(rank_envs))
    )
    started: list[subprocess.Popen[bytes]] = []
    for rank, rank_env in ranks:
        stdout_name, stderr_name = output_files(rank)
        with (lease_dir / stdout_name).open("ab") as stdout, (lease_dir / stderr_name).open("ab") as stderr:
            try:
                started.append(
                    subprocess.Popen(
                        spec["argv"],
                        cwd=spec["cwd"],
                        env={**spec["env"], **rank_env},
                        stdin=subprocess.DEVNULL,
                        stdout=stdout,
                        stderr=stderr,
                        start_new_session=True,  # its own process group: stopping it stops all it started
                    )
                )
            except OSError as error:
                stderr.write(f"takeoff: cannot start {spec['argv'][0]!r}: {error.strerror}\n".encode())
                stop_groups([job.pid for job in started], 0)
                for job in started:
                    job.wait()
                write_atomically(lease_dir / "exit.json", exit_record(127, rank=rank, fenced=False))
                return []
    return started


def exit_record(returncode: int, *, rank: int | None, fenced: bool) -> dict[str, Any]:
    """What ``exit.json`` says of an end: the exit code (128 + n for signal n), the signal, whether the
    fence stopped the job, and for a multi-node launch the rank whose end ended the job."""
    exit_code, killed_by = (returncode, None) if returncode >= 0 else (128 - returncode, -returncode)
    record: dict[str, Any] = {"exit_code": exit_code, "signal": killed_by, "fenced": fenced}
    if rank is not None:
        record["rank"] = rank
    return record


def run_process(lease_dir: Path, spec: dict[str, Any]) -> None:
    """Start the job's processes, wait for them and record how the job ended. A multi-node launch ends
    when all its ranks have exited 0, or as soon as one fails: the shim then stops the others and records
    the exit of the rank that failed first."""
    jobs = start_ranks(lease_dir, spec)
    if not jobs:
        return
    groups = {"job_pid": jobs[0].pid} | ({"rank_pids": [job.pid for job in jobs]} if len(jobs) > 1 else {})
    write_atomically(lease_dir / "shim.json", {"shim_pid": os.getpid(), **groups})
    failed, fenced = wait_for_end(lease_dir, jobs)
    # A job's end is the end of every process it started, as a container's is: nothing of it may run on
    # unsupervised once its exit is recorded. That stops the ranks still running after one failed, and
    # what any rank left behind in its group (a reaped leader's group is only what is left of it).
    grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
    stop_groups([job.pid for job in jobs], grace, terminated=(lease_dir / STOPPING).exists())
    returncodes = [job.wait() for job in jobs]
    if failed is not None and len(jobs) > 1:
        record = exit_record(returncodes[failed], rank=failed, fenced=fenced)
    else:
        record = exit_record(next((code for code in returncodes if code), 0), rank=None, fenced=fenced)
    write_atomically(lease_dir / "exit.json", record)


def wait_for_end(lease_dir: Path, jobs: list[subprocess.Popen[bytes]]) -> tuple[int | None, bool]:
    """Until every process has exited 0, one has failed (which: its index), or the fence has lapsed.

    A thread waits for each process, so the shim learns of each end as it happens, in the order the
    processes end: the first rank to fail is the one named, not a peer that failed because of it."""
    ended: queue.SimpleQueue[int] = queue.SimpleQueue()

    def report_end(index: int, job: subprocess.Popen[bytes]) -> None:
        job.wait()
        ended.put(index)

    for index, job in enumerate(jobs):
        threading.Thread(target=report_end, args=(index, job), daemon=True).start()
    for _ in jobs:
        while True:
            try:
                index = ended.get(timeout=FENCE_CHECK_SECONDS)
                break
            except queue.Empty:
                if lease_lapsed(lease_dir):
                    return None, True
        if jobs[index].returncode:
            return index, False
    return None, False


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
