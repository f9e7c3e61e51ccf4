"""SQLite for SQLAlchemy's asyncio engine without a thread hand-off per call (docs/design.md §9 "Databases").

aiosqlite runs each call SQLAlchemy makes (cursor, execute, fetch, close, commit) on a thread of its own
and wakes the event loop with each answer: about 120 µs of CPU per call and four calls per statement,
where SQLite's own work on a service's small transactions is a few µs. That hand-off was the largest part
of a write's CPU in the queue and the registry.

:class:`InlineConnection` stands in for aiosqlite's connection under SQLAlchemy's aiosqlite dialect
(``async_creator``): a statement runs on the event loop's thread, and a result's rows are read with it.
Only what may wait leaves the loop, for a worker thread:

- a COMMIT, which may fsync (``synchronous=FULL``, or a checkpoint);
- a statement that finds the database locked by another connection (a second writer of this process, or
  another process): it is tried at once with no busy timeout and, when SQLite answers SQLITE_BUSY, which
  changes nothing, run again on a worker thread that waits out the busy timeout there (an executemany
  outside a transaction, whose rows commit one by one, waits there from the start). So the loop never
  sleeps in SQLite's busy handler, and two writers of one process never wait on each other while holding
  the loop. Commits have threads of their own: one never queues behind the writers waiting for its lock.

Errors are sqlite3's, as aiosqlite's are; connections are used by one task at a time, as SQLAlchemy's pool
hands them out, and an operation left on a worker thread by a cancelled caller is waited for before the
connection's next one.

A statement's own run is the loop's time: the services' statements are small and indexed, and the longest,
a retention pass's DELETE of 100,000 rows, takes about 90 ms. A long one cannot be moved off the loop once
it runs: interrupting a write rolls back its whole transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

SQLITE_BUSY = 5
SQLITE_BUSY_SNAPSHOT = 517
"""A snapshot too old to write from: waiting does not help, so it is not waited on."""

_COMMITS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="takeoff-sqlite-commit")
"""Where COMMITs run: apart from the waits, so that a commit never queues behind the writers waiting for
the lock it would free (a WAL commit waits for no other connection: a few threads suffice)."""
_WAITS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="takeoff-sqlite-wait")
"""Where statements locked out wait: one thread each (a process's pools hold fewer connections)."""


def _locked(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == SQLITE_BUSY and code != SQLITE_BUSY_SNAPSHOT


class InlineCursor:
    """What SQLAlchemy's aiosqlite adapter uses of aiosqlite's cursor. ``execute`` reads every row of a
    result at once, so that a statement and its rows run (and, locked out, wait) as one."""

    def __init__(self, connection: InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection.raw.cursor()
        self._rows: deque[Any] = deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def execute(self, operation: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> InlineCursor:
        await self._connection.run(lambda: self._take(self._cursor.execute(operation, parameters)))
        return self

    async def executemany(self, operation: str, parameters: Iterable[Any]) -> InlineCursor:
        batch = list(parameters)  # a generator could not be run again after a lock
        await self._connection.run(
            lambda: self._take(self._cursor.executemany(operation, batch)),
            # Outside a transaction each row commits by itself: one locked out midway must not run again
            # the rows before it, so the whole call waits (per row) on a worker thread.
            retry_safe=self._connection.raw.in_transaction
            or self._connection.raw.isolation_level is not None,
        )
        return self

    def _take(self, cursor: sqlite3.Cursor) -> None:
        self._rows = deque(cursor.fetchall()) if cursor.description else deque()
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int = 1) -> list[Any]:
        return [self._rows.popleft() for _ in range(min(size, len(self._rows)))]

    async def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        self._rows.clear()
        self._cursor.close()


class InlineConnection:
    """What SQLAlchemy's aiosqlite adapter uses of ``aiosqlite.Connection``, with SQLite's work done on the
    event loop's thread (see the module's docstring)."""

    def __init__(self, raw: sqlite3.Connection, busy_timeout_ms: int) -> None:
        self.raw = raw
        self._busy_timeout_ms = busy_timeout_ms
        self._behind: asyncio.Future[Any] | None = None
        """An operation on a worker thread that its caller stopped waiting for: finished before the next."""
        # SQLAlchemy's adapter sets an isolation level (AUTOCOMMIT, or the pool's reset of it) through
        # aiosqlite's internals: the sqlite3 connection, and a queue of calls to run on its thread.
        self._conn = raw
        self._tx = _RunAtOnce()

    @classmethod
    def connect(cls, path: str, busy_timeout_ms: int) -> Callable[[], Awaitable[InlineConnection]]:
        """An ``async_creator`` for SQLAlchemy: each call opens ``path``."""

        async def create() -> InlineConnection:
            # No busy timeout on the loop's thread: a locked database is waited for on a worker thread.
            raw = sqlite3.connect(path, timeout=0, check_same_thread=False)
            return cls(raw, busy_timeout_ms)

        return create

    @property
    def isolation_level(self) -> str | None:
        return self.raw.isolation_level

    async def run(self, operation: Callable[[], T], *, retry_safe: bool = True) -> T:
        """``operation`` on the loop's thread; when the database is locked, again on a worker thread that
        waits for it. One that is not ``retry_safe`` (it may have written before it was locked out) runs
        on a worker thread from the start."""
        await self._catch_up()
        if retry_safe:
            try:
                return operation()
            except sqlite3.OperationalError as error:
                if not _locked(error):
                    raise
        return await self._off_loop(_WAITS, lambda: self._waiting(operation))

    def _waiting(self, operation: Callable[[], T]) -> T:
        self.raw.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        try:
            return operation()
        finally:
            self.raw.execute("PRAGMA busy_timeout=0")

    async def _off_loop(self, executor: ThreadPoolExecutor, operation: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(executor, operation)
        self._behind = future
        return await asyncio.shield(future)

    async def _catch_up(self) -> None:
        if self._behind is not None:
            if not self._behind.done():
                await asyncio.wait([self._behind])
            if not self._behind.cancelled():
                self._behind.exception()  # its caller gave up on it: what it raised is nobody's to hear
            self._behind = None

    async def cursor(self) -> InlineCursor:
        await self._catch_up()
        return InlineCursor(self)

    async def execute(self, operation: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> InlineCursor:
        cursor = await self.cursor()
        return await cursor.execute(operation, parameters)

    async def commit(self) -> None:
        await self._catch_up()
        if self.raw.in_transaction:  # a read-only transaction has nothing to write
            await self._off_loop(_COMMITS, lambda: self._waiting(self.raw.commit))

    async def rollback(self) -> None:
        await self.run(self.raw.rollback)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self.raw.create_function(*args, **kwargs)

    async def close(self) -> None:
        await self._catch_up()
        self.raw.close()

    def stop(self) -> None:
        """Close now, without waiting (SQLAlchemy's terminate); after any operation still on a thread."""
        if self._behind is not None and not self._behind.done():
            self._behind.add_done_callback(lambda _: self.raw.close())
        else:
            self.raw.close()


class _RunAtOnce:
    """Stands in for aiosqlite's queue of calls to its thread: runs each call on the spot."""

    def put_nowait(self, call: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = call
        try:
            result = function()
        except BaseException as error:  # handed to the awaiting caller, as aiosqlite's thread would
            if future is not None:
                future.set_exception(error)
            return
        if future is not None:
            future.set_result(result)
