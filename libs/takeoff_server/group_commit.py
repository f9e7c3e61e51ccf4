"""Group commit: many state changes, one transaction, then everyone waiting on them is answered.

Callers ``await committer.commit(work)``; ``work`` runs on a connection inside a transaction shared with
whatever else was submitted while the previous transaction was being written. Under load this turns N
fsyncs into one without giving up durability: nobody is answered before their change is committed.

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
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from takeoff_server.db_errors import DATABASE_OUTAGES

T = TypeVar("T")

Work = Callable[[AsyncConnection], Awaitable[Any]]

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
"""deadlock_detected and serialization_failure: the database undid the whole transaction for its timing."""
MAX_TRIES = 5


class GroupCommitter:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._waiting: list[tuple[Work, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def commit(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
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
                async with self._engine.begin() as connection:
                    return [await work(connection) for work, _ in batch]
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
