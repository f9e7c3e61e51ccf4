"""The local-process runner: each job runs under a shim (see ``shim.py``) in its own lease directory.

The agent starts the shim and forgets nothing it cannot find again: after a restart, ``LocalJob(dir)``
picks a job back up from its files, whether it is still running or ended while the agent was away.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from takeoff_agent.shim import stop_group, write_atomically

EXIT_POLL_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class JobSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stop_grace_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class JobExit:
    exit_code: int
    signal: int | None
    fenced: bool
    """The shim stopped the job because the agent's leases ran out."""


def copy_code(code_path: Path, work_dir: Path) -> None:
    """A fresh copy of the built code for one attempt: jobs may write into their working directory."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    shutil.copytree(code_path, work_dir, symlinks=True)


class LocalJob:
    """One job under its shim, found through its lease directory."""

    def __init__(self, lease_dir: Path) -> None:
        self.lease_dir = lease_dir
        self._shim: asyncio.subprocess.Process | None = None

    @property
    def stdout(self) -> Path:
        return self.lease_dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.lease_dir / "stderr.log"

    @property
    def started(self) -> bool:
        return (self.lease_dir / "spec.json").exists()

    async def start(self, spec: JobSpec) -> None:
        write_atomically(
            self.lease_dir / "spec.json",
            {
                "argv": spec.argv,
                "env": spec.env,
                "cwd": spec.cwd,
                "stop_grace_seconds": spec.stop_grace_seconds,
            },
        )
        self._shim = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "takeoff_agent.shim",
            str(self.lease_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # outlives the agent: a restarted agent takes the job back
        )

    def exit(self) -> JobExit | None:
        try:
            data = json.loads((self.lease_dir / "exit.json").read_text())
        except (OSError, ValueError):
            return None
        return JobExit(data["exit_code"], data["signal"], data["fenced"])

    def _pids(self) -> tuple[int, int] | None:
        try:
            data = json.loads((self.lease_dir / "shim.json").read_text())
        except (OSError, ValueError):
            return None
        return data["shim_pid"], data["job_pid"]

    def _shim_alive(self) -> bool:
        if self._shim is not None:
            return self._shim.returncode is None
        pids = self._pids()
        if pids is None:
            return (self.lease_dir / "spec.json").exists() and self.exit() is None
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> JobExit:
        """The job's end: from its shim's exit when the agent started it, else by watching its files."""
        while True:
            if self._shim is not None:
                await self._shim.wait()
            if (ended := self.exit()) is not None:
                return ended
            if not self._shim_alive():
                # The shim died without a word (killed, perhaps along with the machine's processes). Its job
                # may live on, unsupervised: stop it, so that the outcome reported is what happened.
                await self.stop(0)
                return JobExit(exit_code=137, signal=signal.SIGKILL, fenced=False)
            await asyncio.sleep(EXIT_POLL_SECONDS)

    async def stop(self, grace: float) -> None:
        """SIGTERM the job's process group, SIGKILL after ``grace``; the shim then records the exit."""
        pids = self._pids()
        if pids is not None and self.exit() is None:
            await asyncio.to_thread(stop_group, pids[1], grace)

    def renew_lease(self, until: float) -> None:
        """Tell the shim the agent's leases are good until ``until`` (UNIX seconds)."""
        partial = self.lease_dir / "lease_until.partial"
        partial.write_text(repr(until))
        partial.replace(self.lease_dir / "lease_until")
