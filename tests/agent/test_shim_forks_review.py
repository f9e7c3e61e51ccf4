"""Review of the shims' fork server (runners/shims.py ShimStarter, shim.serve_forks): the defects it found,
each a test that failed on the code reviewed and passes since its fix (D1, D3, D4, D5; D2, a start cancelled
while it waited for a dead server's answers to end, which cancelled the shared reader, is shielded, and no
longer reachable on purpose: a dead server is now seen before it is asked). Real fork servers, real shims,
real jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import sys
from pathlib import Path

import pytest

from takeoff_agent.domain import ResourceKind
from takeoff_agent.runners.base import RunnerContext
from takeoff_agent.runners.local_process import LocalProcessRunner
from takeoff_agent.runners.shims import ShimStarter
from tests.agent.test_relay import assignment, launch
from tests.agent.test_shim_forks import lease_dir

WITHIN = 30.0
GONE_WITHIN = 5.0
"""How long a process that should be gone (or an end that should be learnt) is polled for."""


def stat_of(pid: int) -> list[bytes] | None:
    """State, parent, ... of ``pid`` (fields after the command), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def parent_of(pid: int) -> int:
    fields = stat_of(pid)
    assert fields is not None, f"{pid} is gone"
    return int(fields[1])


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    fields = stat_of(pid)
    return fields is not None and fields[0] != b"Z"


def _command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def fork_servers() -> set[int]:
    """This process's children that are shims' fork servers."""
    return {pid for pid in children_of(os.getpid()) if _command_line(pid).endswith(b"shim.py\0")}


def children_of(parent: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_of(int(entry))
            if fields is not None and int(fields[1]) == parent and fields[0] != b"Z":
                found.add(int(entry))
    return found


async def until(condition, within: float = GONE_WITHIN) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a process's state) until it holds or ``within`` has passed: whether it held."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)  # polling the processes' state, not waiting out time
    return True


def waiting_on(home: Path, name: str) -> tuple[Path, Path]:
    """A lease whose job waits (``cat FIFO``) until ``release`` writes to its FIFO."""
    fifo = home / f"{name}.fifo"
    os.mkfifo(fifo)
    return lease_dir(home, name, ["timeout", "30", "cat", str(fifo)]), fifo  # ends itself at worst


_released: set[Path] = set()


async def release(fifo: Path) -> None:
    """Let a ``cat FIFO`` job end: once it has the FIFO open (polled), a line for it. Once per FIFO."""
    if fifo in _released:
        return
    _released.add(fifo)
    deadline = asyncio.get_running_loop().time() + GONE_WITHIN
    while True:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet (or none any more: the job is gone)
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.01)  # polling the FIFO's state
            continue
        os.write(descriptor, b"go on\n")
        os.close(descriptor)
        return


async def test_a_lease_directory_with_a_nul_is_refused_and_breaks_nothing(tmp_path: Path) -> None:
    """create_subprocess_exec refused such an argument (ValueError: embedded null byte). Now the NUL frames
    the server's protocol: ``odd\\0{running lease}`` forks a second shim of a running job, and the second
    ``started`` pops an empty deque (IndexError): the running shims' ends are never learnt."""
    waiting, fifo = waiting_on(tmp_path, "waiting")
    starter = ShimStarter()
    try:
        first = await starter.start(waiting)
        with pytest.raises(ValueError, match="NUL"):
            await starter.start(Path(f"{tmp_path / 'odd'}\0{waiting}"))
        await release(fifo)
        assert await until(lambda: not first.running, WITHIN), "its end is never learnt"
    finally:
        await release(fifo)
        await starter.close()


async def test_close_during_the_first_start_leaves_no_server_running(tmp_path: Path) -> None:
    """D4. close() while the first start creates the server: close() waits for that start, then ends the
    server; no server runs on, and the starter starts nothing after."""
    earlier = fork_servers()  # of other tests in this process (their runners left unclosed)
    starter = ShimStarter()
    start = asyncio.create_task(starter.start(lease_dir(tmp_path, "job", [sys.executable, "-c", "pass"])))
    await asyncio.sleep(0)  # one turn: it is creating the server
    assert not start.done()
    await starter.close()
    shim = None
    with contextlib.suppress(Exception):
        shim = await start
    try:
        if shim is not None:  # a closed starter follows its shims no more: the process is looked at
            assert await until(lambda: not alive(shim.pid), WITHIN)
        serving = fork_servers() - earlier
        assert await until(lambda: not any(alive(pid) for pid in serving)), (
            f"a fork server runs on after close(): {serving}"
        )
    finally:
        await starter.close()


async def test_a_start_just_after_the_server_died_goes_to_a_new_server(tmp_path: Path) -> None:
    """The write to the dead server's stdin fails (EPIPE) inside the transport, which only closes itself;
    drain() returns before the pipe's loss reaches the stream (two call_soon's later), so no ConnectionError:
    the ask waits for the dead server's answer, and fails RunnerUnavailable (RUNNER_INFRA, the attempt
    failed) where design.md says an ask the server never read goes to the next server."""
    waiting, fifo = waiting_on(tmp_path, "waiting")
    starter = ShimStarter()
    try:
        first = await starter.start(waiting)
        server = parent_of(first.pid)
        pidfd = os.pidfd_open(server)
        try:
            os.kill(server, signal.SIGKILL)
            # Until it has exited (its pipes closed), with no turn of the loop: the agent saw nothing yet.
            assert select.select([pidfd], [], [], WITHIN)[0]
        finally:
            os.close(pidfd)
        second = await starter.start(lease_dir(tmp_path, "next", ["true"]))
        async with asyncio.timeout(WITHIN):
            await second.ended()
    finally:
        await release(fifo)
        await starter.close()


async def test_a_start_given_up_midway_leaves_no_job_running_once_stopped(tmp_path: Path) -> None:
    """D1. The attempt gives up a job's start when a stop comes first (cancel, revoke): the fork server forks
    the shim whatever, so the job's stop() waits for the start it gave up and stops what its shim started.
    Before, stop() found no shim.json yet and returned, and the job ran on after its lease had ended."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(f"open({str(fifo)!r}).read()\n")  # waits until the FIFO is written
    runner = LocalProcessRunner(RunnerContext("a1", tmp_path / "state"))
    work = assignment(ResourceKind.LOCAL_PROCESS)
    lease = tmp_path / "state" / "leases" / work.lease_id
    lease.mkdir(parents=True)
    job = runner.job(work, lease)
    try:
        start = asyncio.create_task(job.start(launch(work, tmp_path)))
        assert await until(lambda: job._starting is not None, WITHIN)  # the shim is asked for: give up now
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)

        await job.stop(1)

        assert (lease / "exit.json").exists(), "the job of the start given up was not stopped"
        assert json.loads((lease / "exit.json").read_text())["signal"] == signal.SIGTERM
    finally:
        await release(fifo)
        await runner.close()


async def test_the_end_of_a_dead_servers_answers_touches_nothing_of_the_next_server(tmp_path: Path) -> None:
    """The dead server's answers end (EOF) after the next server was started and asked: that end fails no
    ask of the next server and hands none of its shims to a pidfd. The dead server's stdout is held open
    (through /proc) until an ask is with the next server, then let go."""
    first_lease, first_fifo = waiting_on(tmp_path, "first")
    second_lease, second_fifo = waiting_on(tmp_path, "second")
    starter = ShimStarter()
    hold = -1
    try:
        first = await starter.start(first_lease)
        dead = parent_of(first.pid)
        hold = os.open(f"/proc/{dead}/fd/1", os.O_WRONLY)  # its answers: no end while held
        os.kill(dead, signal.SIGKILL)
        assert await until(lambda: parent_of(first.pid) != dead, WITHIN)
        second = await starter.start(second_lease)  # the next server: the dead one's pidfd is readable
        assert parent_of(second.pid) != dead
        third = asyncio.create_task(starter.start(lease_dir(tmp_path, "third", ["true"])))
        await asyncio.sleep(0)  # one turn: its ask is written to the next server, its answer awaited
        os.close(hold)
        hold = -1
        async with asyncio.timeout(WITHIN):
            await (await third).ended()
        await release(second_fifo)
        async with asyncio.timeout(WITHIN):
            await second.ended()  # from the next server's answer, not a pidfd of the dead one's making
        await release(first_fifo)
        async with asyncio.timeout(WITHIN):
            await first.ended()
    finally:
        if hold >= 0:
            os.close(hold)
        await release(first_fifo)
        await release(second_fifo)
        await starter.close()
