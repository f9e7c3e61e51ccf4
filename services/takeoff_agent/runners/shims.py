"""Shims (``shim.py``) started as forks of one fork server, not as interpreters of their own.

Every local job and every container has a shim, and each used to pay an interpreter's start (``python -I -S
shim.py``: about 12 ms of CPU, and as much wall time before the job's own start). A runner's
:class:`ShimStarter` starts the fork server (``shim.serve_forks``) the first time it needs a shim and asks
it for each one: a fork of a process that has imported the shim already. The server is the shims' parent
and says when each has ended, as a child process's end is learnt; a shim outlives it (its own session), as
it outlives the agent (docs/design.md §7 "The shim's fork server").
"""

from __future__ import annotations

import asyncio
import os
import select
import sys
from collections import deque
from pathlib import Path

from takeoff_agent import shim
from takeoff_agent.runners.base import RunnerUnavailable

SERVER_COMMAND = (sys.executable, "-I", "-S", shim.__file__)
"""By path, isolated (``-I``: no ``PYTHON*`` variables, no user site) and without ``site`` (``-S``): a shim
imports nothing but the standard library (docs/design.md §7)."""


class Shim:
    """A shim the fork server started: running until it has ended."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ended = asyncio.Event()

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    async def ended(self) -> None:
        await self._ended.wait()

    def end_seen(self) -> None:
        self._ended.set()


def started_shim(starting: asyncio.Task[Shim] | None) -> Shim | None:
    """The shim a start task started, once it has (None before, and for a start that failed)."""
    if starting is None or not starting.done() or starting.cancelled() or starting.exception() is not None:
        return None
    return starting.result()


class ShimStarter:
    """Starts shims through the fork server, which it starts (again) when it is not running."""

    def __init__(self) -> None:
        self._server: _Server | None = None
        self._asking = asyncio.Lock()
        self._closed = False
        self._orphans: set[asyncio.Task[None]] = set()

    async def start(self, lease_dir: Path) -> Shim:
        """Start the shim of ``lease_dir``. RunnerUnavailable when the server ended after it was asked and
        before it answered (whether it forked the shim is not known: the lease directory tells), or once
        the starter is closed. A caller that gives up after asking leaves the shim to start: it stops it
        as it stops any job it may have started (its lease directory)."""
        asked = os.fsencode(lease_dir)  # relative: the server has the agent's working directory
        if b"\0" in asked:
            raise ValueError(f"a lease directory has no NUL in its path: {lease_dir!r}")
        async with self._asking:  # one question at a time: the answers come in the order asked
            for _ in range(2):
                if self._closed:
                    raise RunnerUnavailable("the runner is closing: it starts no more jobs")
                server = await self._serving()
                answer = server.ask(asked)
                try:
                    await server.sent()
                except ConnectionError:  # it had ended, and never read this: the next server is asked
                    await asyncio.shield(server.answers)  # which fails what was asked of it, this too
                    answer.exception()  # retrieved
                    continue
                return await answer
        raise RunnerUnavailable("the shims' fork server ended as it was started, twice")

    async def close(self) -> None:
        """End the server, once the starts under way are answered. The shims it started run on, followed no
        more: their ``ended()`` waits on no one (the runner is closing with its agent)."""
        async with self._asking:
            self._closed = True
        server, self._server = self._server, None
        if server is not None:
            await server.close()
        for orphan in list(self._orphans):
            orphan.cancel()

    async def _serving(self) -> _Server:
        """The server, started anew when the last one is gone."""
        if self._server is None or self._server.gone():
            if self._server is not None:
                self._server.forget()  # its answers, if still coming, end on their own
            self._server = _Server(
                await asyncio.create_subprocess_exec(
                    *SERVER_COMMAND,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    start_new_session=True,  # no terminal's signals: it ends when the agent closes its stdin
                ),
                self._orphans,
            )
        return self._server


class _Server:
    """One fork server: what it was asked, the shims it started that have not ended, and its answers."""

    def __init__(self, process: asyncio.subprocess.Process, orphans: set[asyncio.Task[None]]) -> None:
        self._process = process
        self._pidfd = os.pidfd_open(process.pid)
        """Readable once it has exited: a server killed meanwhile is not asked."""
        self._asked: deque[asyncio.Future[Shim]] = deque()
        self._running: dict[int, Shim] = {}
        self._orphans = orphans
        self.answers = asyncio.create_task(self._read_answers())

    def gone(self) -> bool:
        """Its answers have ended, or it has exited (its pidfd is readable) though their end is not read
        yet: asked now, it could not answer."""
        return self.answers.done() or bool(select.select([self._pidfd], [], [], 0)[0])

    def ask(self, lease_dir: bytes) -> asyncio.Future[Shim]:
        answer: asyncio.Future[Shim] = asyncio.get_running_loop().create_future()
        self._asked.append(answer)
        assert self._process.stdin is not None
        self._process.stdin.write(lease_dir + b"\0")
        return answer

    async def sent(self) -> None:
        assert self._process.stdin is not None
        await self._process.stdin.drain()

    async def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        await self._process.wait()
        await asyncio.shield(self.answers)
        self.forget()

    def forget(self) -> None:
        os.close(self._pidfd)

    async def _read_answers(self) -> None:
        assert self._process.stdout is not None
        async for line in self._process.stdout:
            word, pid_text = line.split()
            pid = int(pid_text)
            if word == b"started":
                started = self._running[pid] = Shim(pid)
                asked = self._asked.popleft()
                if not asked.done():  # its caller may have given up
                    asked.set_result(started)
            elif (ended := self._running.pop(pid, None)) is not None:
                ended.end_seen()
        # It ended: the shims it started are no longer children of anyone here.
        while self._asked:
            asked = self._asked.popleft()
            if not asked.done():
                asked.set_exception(RunnerUnavailable("the shims' fork server ended before it answered"))
        for orphan in self._running.values():
            task = asyncio.create_task(_until_gone(orphan))
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)
        self._running.clear()


async def _until_gone(orphan: Shim) -> None:
    """Until the shim has ended, learnt from a pidfd: its server, its parent, is gone."""
    try:
        pidfd = os.pidfd_open(orphan.pid)
    except ProcessLookupError:
        orphan.end_seen()
        return
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(pidfd, gone.set)  # readable once it has exited
    try:
        await gone.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    orphan.end_seen()
