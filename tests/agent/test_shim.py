"""The shim of a local process on its own: its self-fence and the end of its job (docs/design.md §7)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from takeoff_agent.shim import write_atomically
from tests.processes import pid_alive, wait_for

SLEEPER = "import time; print('ready', flush=True); time.sleep(600)"
"""Ends on SIGTERM (Python's default action), long before any grace runs out."""


def test_the_self_fence_records_the_exit_as_soon_as_the_job_is_gone(tmp_path: Path) -> None:
    """A job that ends on SIGTERM is recorded at once: the shim does not wait out the stop grace (600 s,
    far past this test's wait) on a group kept alive only by its own unreaped child."""
    write_atomically(
        tmp_path / "spec.json",
        {"argv": [sys.executable, "-c", SLEEPER], "env": {}, "cwd": str(tmp_path), "stop_grace_seconds": 600},
    )
    write_atomically(tmp_path / "lease_until", time.time() + 3600)
    shim = subprocess.Popen([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)])
    try:
        stdout = tmp_path / "stdout.log"
        wait_for(lambda: stdout.exists() and b"ready" in stdout.read_bytes(), what="the job to start")
        write_atomically(tmp_path / "lease_until", time.time() - 1)  # the agent stopped renewing

        exit_file = tmp_path / "exit.json"
        wait_for(exit_file.exists, timeout=60, what="the shim to record the fenced job's exit")
        assert json.loads(exit_file.read_text()) == {"exit_code": 143, "signal": 15, "fenced": True}
        assert shim.wait(timeout=60) == 0
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


LEAVES_A_CHILD = """\
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
"""
"""Exits at once, leaving a child in its process group."""


def test_processes_the_job_left_behind_are_stopped_before_its_exit_is_recorded(tmp_path: Path) -> None:
    write_atomically(
        tmp_path / "spec.json",
        {
            "argv": [sys.executable, "-c", LEAVES_A_CHILD],
            "env": {},
            "cwd": str(tmp_path),
            "stop_grace_seconds": 5,
        },
    )
    shim = subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)], timeout=60, check=True)

    assert shim.returncode == 0
    assert json.loads((tmp_path / "exit.json").read_text()) == {
        "exit_code": 0,
        "signal": None,
        "fenced": False,
    }
    child = int((tmp_path / "stdout.log").read_text().split()[1])
    assert not pid_alive(child)
