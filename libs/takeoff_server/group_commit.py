"""Group commit: many state changes, one transaction, then everyone waiting on them is answered.

Callers ``await committer.commit(work)``; ``work`` runs inside a transaction (a :class:`Batch`) shared
with whatever else was submitted while the previous transaction was being written. Under load this turns N
fsyncs into one without giving up durability: nobody is answered before their change is committed. Rows
the changes only add (a history, an outbox) are appended to the batch and inserted together, one
executemany per statement, so a statement's fixed cost is paid per batch rather than per change.

A transaction PostgreSQL aborts to break a deadlock (two replicas' batches locking the same rows in
different orders) or as a serialization failure is run again, whole, in a new one: such an abort is about
timing, not the changes, so it costs the batch time, never its writes. ``work`` may therefore run more
than once, and must change nothing but the database through its connection.

A batch that fails over one of its changes (a constraint it violates, a value the database refuses, an
error the work itself raises: a bug, which would fail every batch it joined, and every resend of it) is
written again one change per transaction, so that only that change fails and the changes it happened to
share a batch with commit. A database that fails as a whole (down, full, locked: ``DATABASE_OUTAGES``)
fails the batch at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from takeoff_server.database import Database
from takeoff_server.db_errors import DATABASE_OUTAGES
from takeoff_server.hot_statements import HotStatement, Outcome, Parameters

T = TypeVar("T")


class Batch:
    """The transaction a batch of changes shares: its connection, and the rows its changes appended.

    :meth:`append` holds rows for an INSERT until the next :meth:`execute` (unless that statement says it
    may pass them: ``past_appends``, for one that neither reads nor changes the appended tables) or the
    commit, whichever comes first. Within the transaction the appended rows are thus in place before any
    statement that could see them, in the order they were appended."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self._appends: dict[HotStatement, list[dict[str, Any]]] = {}

    def append(self, insert: HotStatement, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._appends.setdefault(insert, []).extend(rows)

    @overload
    async def execute(
        self, statement: HotStatement, parameters: Parameters = None, *, past_appends: bool = False
    ) -> Outcome: ...

    @overload
    async def execute(
        self, statement: Executable, parameters: Any = None, *, past_appends: bool = False
    ) -> CursorResult[Any]: ...

    async def execute(
        self, statement: HotStatement | Executable, parameters: Any = None, *, past_appends: bool = False
    ) -> Outcome | CursorResult[Any]:
        if not past_appends:
            await self.flush()
        if isinstance(statement, HotStatement):
            return await statement.execute(self.connection, parameters)
        return await self.connection.execute(statement, parameters)

    async def flush(self) -> None:
        appends, self._appends = self._appends, {}
        for insert, rows in appends.items():
            await insert.execute(self.connection, rows)


Work = Callable[[Batch], Awaitable[Any]]

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
"""deadlock_detected and serialization_failure: the database undid the whole transaction for its timing."""
MAX_TRIES = 5


class GroupCommitter:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._waiting: list[tuple[Work, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def commit(self, work: Callable[[Batch], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches())
        return await future

    async def _write_batches(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                _answer(batch, await self._write(batch))
            except Exception as error:
                if isinstance(error, DATABASE_OUTAGES) or len(batch) == 1:
                    _fail(batch, error)
                    continue
                for one in batch:  # the change it was about fails alone
                    try:
                        _answer([one], await self._write([one]))
                    except Exception as alone:
                        _fail([one], alone)

    async def _write(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> list[Any]:
        tries = 0
        while True:
            try:
                async with self._database.transaction() as connection:
                    shared = Batch(connection)
                    results = [await work(shared) for work, _ in batch]
                    await shared.flush()
                    return results
            except DBAPIError as error:
                tries += 1
                if tries == MAX_TRIES or getattr(error.orig, "sqlstate", None) not in RETRIED_SQLSTATES:
                    raise

    async def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)


def _answer(batch: list[tuple[Work, asyncio.Future[Any]]], results: list[Any]) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if not future.done():
            future.set_result(result)


def _fail(batch: list[tuple[Work, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
