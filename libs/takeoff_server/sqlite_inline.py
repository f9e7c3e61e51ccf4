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
  changes nothing, run again on a worker thread that waits out the busy timeout there. So the loop never
  sleeps in SQLite's busy handler, and two writers of one process never wait on each other while holding
  the loop.

Errors are sqlite3's, as aiosqlite's are; connections are used by one task at a time, as SQLAlchemy's pool
hands them out, and an operation left on a worker thread by a cancelled caller is waited for before the
connection's next one.
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

_WAITS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="takeoff-sqlite")
"""Where commits and statements that must wait for a lock run. Started lazily, one thread per wait."""


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
        await self._connection.run(lambda: self._take(self._cursor.executemany(operation, batch)))
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

    async def run(self, operation: Callable[[], T]) -> T:
        """``operation`` on the loop's thread; when the database is locked, again on a worker thread that
        waits for it."""
        await self._catch_up()
        try:
            return operation()
        except sqlite3.OperationalError as error:
            if not _locked(error):
                raise
        return await self._off_loop(lambda: self._waiting(operation))

    def _waiting(self, operation: Callable[[], T]) -> T:
        self.raw.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        try:
            return operation()
        finally:
            self.raw.execute("PRAGMA busy_timeout=0")

    async def _off_loop(self, operation: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(_WAITS, operation)
        self._behind = future
        return await asyncio.shield(future)

    async def _catch_up(self) -> None:
        if self._behind is not None:
            if not self._behind.done():
                await asyncio.wait([self._behind])
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
            await self._off_loop(lambda: self._waiting(self.raw.commit))

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
