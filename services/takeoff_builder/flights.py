"""Single flight across builder replicas that share a PostgreSQL database: advisory locks and notifications.

A build is carried out by the replica holding its flight's session-level advisory lock, taken on a
connection of its own for the build's life (then unlocked and kept for the next lock): a session's locks
go with it, so a replica's death frees its builds at once (the server ends the session when the socket
closes). A replica asked for a flight that another holds follows that build from the database: it LISTENs
for the holder's notifications (sent with each batch of log lines it stores) and queues for the lock, which
it is granted when the holder ends the build or dies. Whoever is granted the lock over an unfinished build
carries it on.

Cache entries (venvs, code, image tags) are locked the same way while they are made (``SharedLocks``), so
two flights that need one entry at the same moment on two replicas make it once.

Lock keys are 64-bit hashes of what is locked and the database's schema, so that deployments sharing one
server in different schemas never wait on each other.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager

import psycopg
from psycopg.pq import TransactionStatus

from takeoff_builder.locks import KeyedLocks
from takeoff_builder.store import build_channel
from takeoff_server.database import libpq_conninfo


def lock_key(*parts: object) -> int:
    """A signed 64-bit advisory lock key for ``parts``."""
    text = "\0".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], signed=True)


Connection = psycopg.AsyncConnection[tuple[object, ...]]
IDLE_LOCK_CONNECTIONS = 8
"""Lock connections kept for the next lock: a connect costs 8-16 ms here (password hashing), a reuse one
round trip, and every Build call that is not joined in-process takes a flight lock."""


class FlightLock:
    """A connection of its own that holds, or queues for, one lock; ``release`` frees it."""

    def __init__(
        self, connection: Connection, key: int, give_back: Callable[[Connection], Awaitable[None]]
    ) -> None:
        self.key = key
        self._connection = connection
        self._give_back = give_back

    async def try_take(self) -> bool:
        cursor = await self._connection.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def take(self) -> None:
        """Wait for the lock: granted when its holder releases it or dies (cancelling stops the wait)."""
        await self._connection.execute("SELECT pg_advisory_lock(%s)", (self.key,))

    @asynccontextmanager
    async def starting(self, key: int) -> AsyncIterator[None]:
        """Hold ``key`` (the flight's start lock) while deciding to build, follow or take over, so that a
        replica never looks for the build of a flight between another's taking the lock and storing it."""
        await self._connection.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            if not self._connection.closed:
                await self._connection.execute("SELECT pg_advisory_unlock(%s)", (key,))

    async def release(self) -> None:
        await self._give_back(self._connection)


class Changes:
    """Notifications that one build changed (``BuildStore.update(notify=True)``), as an event."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.changed = asyncio.Event()
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        async for _ in self._connection.notifies():
            self.changed.set()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._connection.close()


class Flights:
    """Opens the connections that flight locks, cache entry locks and change notifications live on."""

    def __init__(self, database_url: str, *, idle: int = IDLE_LOCK_CONNECTIONS) -> None:
        self._conninfo = libpq_conninfo(database_url)
        self._namespace = ""
        self._idle: list[Connection] = []
        self._max_idle = idle

    async def open(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as connection:
            cursor = await connection.execute("SELECT current_database(), current_schema()")
            row = await cursor.fetchone()
        self._namespace = f"{row[0]}.{row[1]}" if row else ""

    def key(self, kind: str, value: Hashable) -> int:
        """The advisory lock key of ``value`` (a flight, a venv's environment key…) in ``kind``'s space."""
        return lock_key("builder", self._namespace, kind, value)

    async def lock(self, key: int) -> FlightLock:
        return FlightLock(await self._connection(), key, self._give_back)

    async def _connection(self) -> Connection:
        """An idle connection that still answers (the database may have restarted since), else a new one."""
        while self._idle:
            connection = self._idle.pop()
            try:
                await connection.execute("SELECT 1")
            except psycopg.Error:
                await connection.close()
            else:
                return connection
        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    async def _give_back(self, connection: Connection) -> None:
        """Keep ``connection`` for the next lock once it holds none, else close it, which frees them."""
        kept = False
        try:
            if (
                len(self._idle) < self._max_idle
                and not connection.closed
                and connection.info.transaction_status is TransactionStatus.IDLE
            ):
                await connection.execute("SELECT pg_advisory_unlock_all()")
                kept = True
        except psycopg.Error:
            pass  # closed below, like a connection cancelled mid-unlock
        finally:
            if kept:
                self._idle.append(connection)
            else:
                await connection.close()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()

    async def changes(self, build_id: str) -> Changes:
        """Start listening for changes to ``build_id``: read its state after this returns."""
        connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await connection.execute(f'LISTEN "{build_channel(build_id)}"')
        except BaseException:
            await connection.close()
            raise
        return Changes(connection)


class SharedLocks:
    """Per-key locks on cache entries (venvs, code, image tags) that hold across replicas sharing a builds
    directory, so that one entry is made once however many replicas need it at the same moment: the key is
    held in this process first (one connection per key and process at most), then by an advisory lock on a
    connection of its own, freed at once if the replica dies."""

    def __init__(self, flights: Flights, kind: str) -> None:
        self._flights = flights
        self._kind = kind
        self._local = KeyedLocks()

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        async with self._local.hold(key):
            lock = await self._flights.lock(self._flights.key(self._kind, key))
            try:
                await lock.take()
                yield
            finally:
                await lock.release()
