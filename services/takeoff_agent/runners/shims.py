"""Shims (``shim.py``) started as forks of one fork server, not as interpreters of their own.

Every local job and every container has a shim, and each used to pay an interpreter's start (``python -I -S
shim.py``: about 12 ms of CPU, and as much wall time before the job's own start). A runner's
:class:`ShimStarter` starts the fork server (``shim.serve_forks``) the first time it needs a shim and asks
it for each one: a fork of a process that has imported the shim already. The server is the shims' parent
and says when each has ended, as a child process's end is learnt; a shim outlives it (its own session), as
it outlives the agent (docs/design.md §7 "The shim's fork server").

A local job in a venv of the agent's Python also has a warm interpreter: a fork server run by the venv's
own interpreter (``shim.serve_warm_forks``) that has imported what a job's start and ``takeoff.init()``
load, whose shims run the job in a fork rather than an interpreter's start (docs/design.md §7 "Warm
interpreters"). The first job of a venv starts it, after starting as before; the next ones use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from takeoff_agent import shim
from takeoff_agent.runners.base import RunnerUnavailable

logger = logging.getLogger(__name__)

SERVER_COMMAND = (sys.executable, "-I", "-S", shim.__file__)
"""By path, isolated (``-I``: no ``PYTHON*`` variables, no user site) and without ``site`` (``-S``): a shim
imports nothing but the standard library (docs/design.md §7)."""
WARM_SERVER_CODE = """\
import importlib.util, json, sys
if not sys.flags.safe_path:
    del sys.path[0]  # the agent's working directory: a job gets its own sys.path[0]
spec = importlib.util.spec_from_file_location("takeoff_shim", sys.argv[1])
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)
sys.exit(shim.serve_warm_forks(json.loads(sys.argv[2])))
"""
"""A warm interpreter's start (``python -c WARM_SERVER_CODE shim.py START_VARIABLES``): the shim by path,
so that the agent's package is not on the sys.path of the jobs, and its environment (the interpreter's
start may add to it) in JSON."""
WARM_INTERPRETERS = 4
"""The warm interpreters an agent keeps, the most recently used: each holds a venv's interpreter with the
SDK imported (about 17 MB resident, 9 MB of it its own, shared with the jobs it forks)."""


@dataclass(frozen=True)
class WarmStart:
    """Which warm interpreter may run a job: its venv's interpreter, and the variables its start reads
    (``shim.start_variables``) as the job's environment has them."""

    python: str
    start_variables: tuple[tuple[str, str], ...]


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
        self._warm: OrderedDict[WarmStart, _Server] = OrderedDict()
        """Least recently used first."""
        self._never_warm: set[WarmStart] = set()
        """Warm interpreters that ended before they were ready (a broken venv): not started again."""
        self._asking = asyncio.Lock()
        self._closed = False
        self._orphans: set[asyncio.Task[None]] = set()
        self._ending: set[asyncio.Task[None]] = set()
        """Servers let go of (evicted, gone), ending: waited for by close(), never by a start."""

    async def start(self, lease_dir: Path, warm: WarmStart | None = None) -> Shim:
        """Start the shim of ``lease_dir``: forked by ``warm``'s interpreter when it is ready, else by the
        fork server (and ``warm``'s is started, for the next job). RunnerUnavailable when the server ended
        after it was asked and before it answered (whether it forked the shim is not known: the lease
        directory tells), or once the starter is closed. A caller that gives up after asking leaves the
        shim to start: it stops it as it stops any job it may have started (its lease directory)."""
        asked = os.fsencode(lease_dir)  # relative: the server has the agent's working directory
        if b"\0" in asked:
            raise ValueError(f"a lease directory has no NUL in its path: {lease_dir!r}")
        async with self._asking:  # one question at a time: the answers come in the order asked
            if self._closed:
                raise RunnerUnavailable("the runner is closing: it starts no more jobs")
            if warm is not None and (server := self._warm_server(warm)) is not None:
                started = await server.start_shim(asked)
                if started is not None:
                    return started
            started = await self._fork_server_start(asked)
            if warm is not None and warm not in self._warm and warm not in self._never_warm:
                await self._warm_up(warm)  # after this job's start: for the next
            return started

    async def _fork_server_start(self, asked: bytes) -> Shim:
        for _ in range(2):
            started = await (await self._serving()).start_shim(asked)
            if started is not None:
                return started
        raise RunnerUnavailable("the shims' fork server ended as it was started, twice")

    async def close(self) -> None:
        """End the server, once the starts under way are answered. The shims it started run on, followed no
        more: their ``ended()`` waits on no one (the runner is closing with its agent)."""
        async with self._asking:
            self._closed = True
        servers = [*self._warm.values(), *([self._server] if self._server is not None else [])]
        self._server = None
        self._warm.clear()
        await asyncio.gather(*(server.close() for server in servers), *self._ending)
        for orphan in list(self._orphans):
            orphan.cancel()

    def _warm_server(self, warm: WarmStart) -> _Server | None:
        """``warm``'s interpreter once it is ready; None before, and once it has ended (forgotten then)."""
        server = self._warm.get(warm)
        if server is None:
            return None
        if server.gone():
            del self._warm[warm]
            self._end_later(server)
            if not server.ready:
                self._never_warm.add(warm)
            return None
        self._warm.move_to_end(warm)
        return server if server.ready else None

    async def _warm_up(self, warm: WarmStart) -> None:
        """Start ``warm``'s interpreter, and end the least recently used past WARM_INTERPRETERS (their shims
        run on). One that cannot start (its venv's interpreter gone, start variables too long for a command
        line) is said in the agent's log and not started again: the job it was for has started already."""
        try:
            process = await asyncio.create_subprocess_exec(
                warm.python,
                "-c",
                WARM_SERVER_CODE,
                shim.__file__,
                json.dumps(dict(warm.start_variables)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=dict(warm.start_variables),
                start_new_session=True,
            )
        except OSError as error:
            logger.warning("no warm interpreter for %s (%s): its jobs start as before", warm.python, error)
            self._never_warm.add(warm)
            return
        self._warm[warm] = _Server(process, self._orphans, ready=False)
        while len(self._warm) > WARM_INTERPRETERS:
            self._end_later(self._warm.popitem(last=False)[1])

    def _end_later(self, server: _Server) -> None:
        ending = asyncio.create_task(server.close())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

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
                ready=True,
            )
        return self._server


class _Server:
    """One fork server: what it was asked, the shims it started that have not ended, and its answers."""

    def __init__(
        self, process: asyncio.subprocess.Process, orphans: set[asyncio.Task[None]], *, ready: bool
    ) -> None:
        self._process = process
        try:
            self._pidfd: int | None = os.pidfd_open(process.pid)
            """Readable once it has exited: a server killed meanwhile is not asked."""
        except ProcessLookupError:  # exited and reaped already (a venv's interpreter that cannot start)
            self._pidfd = None
        self._asked: deque[asyncio.Future[Shim]] = deque()
        self._running: dict[int, Shim] = {}
        self._orphans = orphans
        self.ready = ready
        """It may be asked: at once for the fork server, once it has said ``ready`` for a warm interpreter
        (its imports are done). Until then it has started no shim."""
        self.answers = asyncio.create_task(self._read_answers())

    def gone(self) -> bool:
        """Its answers have ended, or it has exited (its pidfd is readable) though their end is not read
        yet: asked now, it could not answer."""
        return self._pidfd is None or self.answers.done() or bool(select.select([self._pidfd], [], [], 0)[0])

    async def start_shim(self, lease_dir: bytes) -> Shim | None:
        """The shim it started for ``lease_dir``; None when it had ended and never read the question (the
        next server may be asked); RunnerUnavailable when it ended after reading it, unanswered."""
        answer: asyncio.Future[Shim] = asyncio.get_running_loop().create_future()
        self._asked.append(answer)
        assert self._process.stdin is not None
        self._process.stdin.write(lease_dir + b"\0")
        try:
            await self._process.stdin.drain()
        except ConnectionError:
            await asyncio.shield(self.answers)  # which fails what was asked of it, this too
            answer.exception()  # retrieved
            return None
        return await answer

    async def close(self) -> None:
        """End it at the end of its stdin, or at once while it has started no shim: a warm interpreter not
        ready yet may be in its imports for long (a slow disk, a hanging ``sitecustomize``)."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        if not self.ready:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()
        await asyncio.shield(self.answers)
        self.forget()

    def forget(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _read_answers(self) -> None:
        assert self._process.stdout is not None
        try:
            async for line in self._process.stdout:
                match line.split():
                    case [b"ready", b"0"]:
                        self.ready = True
                    case [b"started", pid] if pid.isdigit() and self._asked:
                        started = self._running[int(pid)] = Shim(int(pid))
                        asked = self._asked.popleft()
                        if not asked.done():  # its caller may have given up
                            asked.set_result(started)
                    case [b"ended", pid] if pid.isdigit():
                        if (ended := self._running.pop(int(pid), None)) is not None:
                            ended.end_seen()
                    case _:  # not the server's: what a warm interpreter's sitecustomize printed at its start
                        continue
        finally:
            self._ended()

    def _ended(self) -> None:
        """It ended: the shims it started are no longer children of anyone here."""
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
