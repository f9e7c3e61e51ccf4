"""The supervisor of one local job: ``python -m takeoff_agent.shim LEASE_DIR``.

It outlives the agent (own session), so a job survives an agent restart, and leaves in LEASE_DIR all
an agent needs to take the job back or learn how it ended:

- ``spec.json`` (written by the agent): argv, env, cwd of the job;
- ``stdout.log``, ``stderr.log``: the job's output, appended as it comes;
- ``shim.json``: the shim's pid and the job's pid (= its process group);
- ``exit.json``: how the job ended: exit code, or the signal that killed it, and whether the shim
  stopped it because the agent's lease ran out (written last, atomically).

Self-fencing: the agent writes the time its leases are good until to ``lease_until`` whenever it renews
them. If that time passes (the agent is dead or cut off from the queue), the shim stops the job: a lost
agent's job and the next attempt never run side by side for long.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FENCE_CHECK_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0


def write_atomically(path: Path, data: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def lease_until(lease_dir: Path) -> float | None:
    try:
        return float((lease_dir / "lease_until").read_text())
    except (OSError, ValueError):
        return None


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the job's process group, then SIGKILL it if it is still there after ``grace``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def main(lease_dir: Path) -> int:
    spec = json.loads((lease_dir / "spec.json").read_text())
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
            return 0
    write_atomically(lease_dir / "shim.json", {"shim_pid": os.getpid(), "job_pid": job.pid})
    grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
    fenced = False
    while True:
        try:
            returncode = job.wait(timeout=FENCE_CHECK_SECONDS)
            break
        except subprocess.TimeoutExpired:
            until = lease_until(lease_dir)
            if until is not None and time.time() > until and not fenced:
                fenced = True
                stop_group(job.pid, grace)
    exit_code, killed_by = (returncode, None) if returncode >= 0 else (128 - returncode, -returncode)
    write_atomically(lease_dir / "exit.json", {"exit_code": exit_code, "signal": killed_by, "fenced": fenced})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
