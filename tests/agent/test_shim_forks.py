"""The shims' fork server (docs/design.md §7 "The shim's fork server"), as a runner uses it through
:class:`ShimStarter`: real shims forked by a real ``python -I -S shim.py`` running real jobs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from takeoff_agent.runners.shims import ShimStarter
from takeoff_agent.shim import write_atomically

WITHIN = 60.0


def lease_dir(home: Path, name: str, argv: list[str]) -> Path:
    lease = home / name
    (lease / "work").mkdir(parents=True)
    spec = {"argv": argv, "env": {"PATH": os.environ["PATH"]}, "cwd": str(lease / "work")}
    write_atomically(lease / "spec.json", {**spec, "stop_grace_seconds": 5})
    return lease


def exit_code(lease: Path) -> int:
    code: int = json.loads((lease / "exit.json").read_text())["exit_code"]
    return code


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


async def test_shims_asked_for_together_each_run_their_job_and_each_end_is_learnt(tmp_path: Path) -> None:
    starter = ShimStarter()
    try:
        leases = [
            lease_dir(tmp_path, str(code), [sys.executable, "-c", f"raise SystemExit({code})"])
            for code in range(5)
        ]
        shims = await asyncio.gather(*(starter.start(lease) for lease in leases))
        assert len({shim.pid for shim in shims}) == len(leases)
        async with asyncio.timeout(WITHIN):
            await asyncio.gather(*(shim.ended() for shim in shims))
        assert not any(shim.running for shim in shims)
        assert [exit_code(lease) for lease in leases] == list(range(5))
    finally:
        await starter.close()


async def test_a_shim_outlives_its_killed_server_its_end_is_still_learnt_and_a_new_server_starts_the_next(
    tmp_path: Path,
) -> None:
    """Killed, the server is no longer the shim's parent to say when it ends: the end is learnt all the same
    (a pidfd), and the next shim is asked of a server started for it."""
    go = tmp_path / "go"
    os.mkfifo(go)
    # Until the test writes to the FIFO (a minute at most: a failed test leaves no process behind).
    waiting = lease_dir(tmp_path, "waiting", ["timeout", "60", "cat", str(go)])
    starter = ShimStarter()
    try:
        first = await starter.start(waiting)
        server = parent_of(first.pid)
        os.kill(server, signal.SIGKILL)
        for _ in range(
            6000
        ):  # until it is gone (its shim has another parent): asked now, it would not answer
            if parent_of(first.pid) != server:
                break
            await asyncio.sleep(0.01)  # polling the process's state, not waiting out time
        second = await starter.start(lease_dir(tmp_path, "next", ["true"]))
        async with asyncio.timeout(WITHIN):
            await second.ended()
        assert first.running, "the job waits on its FIFO: its shim runs on"

        await asyncio.to_thread(go.write_text, "go on\n")  # opens once cat has: cat then ends
        async with asyncio.timeout(WITHIN):
            await first.ended()
        assert exit_code(waiting) == 0
        assert (waiting / "stdout.log").read_text() == "go on\n"
    finally:
        await starter.close()
