"""Queue replicas (docs/design.md §5 "Several queue replicas"): what keeps one replica's index in step with
the database that the others write to.

Every commit NOTIFYs the items and queues it wrote, in its own transaction, so a notification arrives only
for what is committed. Each replica LISTENs and reads those again. A LISTEN connection that drops loses the
notifications sent meanwhile, so on every (re)connection, and every :data:`SCAN_INTERVAL`, the replica
compares every unfinished item and every queue with the database. Its sweeper ends the leases of agents
whose expiry passed by the database's clock, whichever replica they heartbeated to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from takeoff_queue.book import QueueBook
from takeoff_queue.dispatcher import Dispatcher, LeaseTiming
from takeoff_queue.store import AGENTS_CHANNEL, ITEMS_CHANNEL, QUEUES_CHANNEL, QueueStore
from takeoff_server.database import libpq_conninfo

logger = logging.getLogger(__name__)

SCAN_INTERVAL = timedelta(seconds=60)
"""How often a replica compares its index with the database, for notifications it never received."""
_RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "3"}
"""A LISTEN connection only reads: without TCP keepalives a half-open one (a partition, a database failover
without a reset) would fail no call, and notifications would stop unnoticed until the next scan."""


def bound_waits(engine: AsyncEngine, timing: LeaseTiming) -> None:
    """On every connection of a replica: a transaction left open by a replica that stopped mid-commit
    (SIGSTOP, cut off) is ended by PostgreSQL after a third of the TTL, freeing its row locks, and a write
    waits for a lock at most a heartbeat interval, failing (and being rolled back and tried again) rather
    than holding up every commit behind it until leases expire."""
    idle_ms = int(timing.ttl.total_seconds() * 1000 / 3)
    lock_ms = int(timing.heartbeat_interval.total_seconds() * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _bounded(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
        cursor.execute(f"SET lock_timeout = {lock_ms}")
        cursor.close()


def replica_name() -> str:
    """This process's name among the replicas, as its notifications carry it (so it skips its own)."""
    host = socket.gethostname().replace(":", "-")  # the name ends at the payload's first colon
    return f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def listen_url(database_url: str) -> str:
    """The libpq form of a ``postgresql://`` (or ``postgresql+psycopg://``) URL, with TCP keepalives."""
    return libpq_conninfo(database_url, _KEEPALIVES)


class ReplicaSync:
    def __init__(
        self,
        database_url: str,
        store: QueueStore,
        dispatcher: Dispatcher,
        book: QueueBook,
        timing: LeaseTiming,
    ) -> None:
        self._url = listen_url(database_url)
        self._store = store
        self._dispatcher = dispatcher
        self._book = book
        self._timing = timing
        self._items: set[str] = set()
        self._queues: set[str] = set()
        self._agents: set[str] = set()
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Follow the others. Unlike a single queue's restart, no lease gets grace: their expiry is the
        database's, which ran on while this replica was away (and an agent whose heartbeats went
        unanswered past it has stopped its work itself, §7)."""
        for work in (self._listen(), self._apply(), self._sweep(), self._scan()):
            self._tasks.append(asyncio.create_task(work))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as connection:
                    for channel in (AGENTS_CHANNEL, ITEMS_CHANNEL, QUEUES_CHANNEL):
                        await connection.execute(f"LISTEN {channel}")
                    failures = 0
                    await self._resync()  # what was committed while nobody here listened
                    async for notice in connection.notifies():
                        self._noticed(notice.channel, notice.payload)
            except (psycopg.Error, OSError) as error:
                logger.warning("queue replica notifications lost (%s); listening again", error)
            except Exception:  # the catch-up read failed: listen again, and catch up again
                logger.exception("following the other queue replicas failed; listening again")
            await asyncio.sleep(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])
            failures += 1

    def _noticed(self, channel: str, payload: str) -> None:
        sender, _, names = payload.partition(":")
        if sender == self._store.replica or not names:
            return
        noticed = {AGENTS_CHANNEL: self._agents, ITEMS_CHANNEL: self._items, QUEUES_CHANNEL: self._queues}
        noticed[channel].update(names.split(","))
        self._work.set()

    async def _apply(self) -> None:
        """Read again what the others wrote: agents that connected there first (their stale sessions here
        must not be taken for live ones by what follows), then queues, since new items name them."""
        while True:
            await self._work.wait()
            self._work.clear()
            agents, self._agents = self._agents, set()
            queues, self._queues = self._queues, set()
            items, self._items = self._items, set()
            try:
                for agent_id in agents:
                    await self._dispatcher.agent_connected_elsewhere(agent_id)
                for name in sorted(queues):
                    await self._book.reload_queue(name)
                await self._dispatcher.refresh(items)
                # Their writes may have put rows in the outboxes, which only their commits wake drainers for.
                self._dispatcher.wake_drainers()
            except Exception:  # the database blinked: read them again shortly
                logger.exception("reading what other queue replicas wrote failed; trying again")
                self._agents |= agents
                self._queues |= queues
                self._items |= items
                await asyncio.sleep(_RECONNECT_DELAYS[-2])
                self._work.set()

    async def _sweep(self) -> None:
        """End the leases of agents that stopped renewing them, by the database's clock."""
        period = min(max(self._timing.ttl.total_seconds() / 6, 0.1), 5.0)
        while True:
            await asyncio.sleep(period)
            await self._quietly("sweeping expired leases", self._sweep_once())

    async def _sweep_once(self) -> None:
        for agent_id in await self._store.expired_agents():
            await self._dispatcher.expire_agent(agent_id)

    async def _scan(self) -> None:
        while True:
            await asyncio.sleep(SCAN_INTERVAL.total_seconds())
            await self._quietly("comparing the index with the database", self._resync())

    async def _resync(self) -> None:
        stored = {queue.name: queue for queue in await self._store.queues()}
        for name in set(stored) | set(self._dispatcher.queues):
            if stored.get(name) != self._dispatcher.queues.get(name):
                await self._book.reload_queue(name)
        await self._dispatcher.resync()
        self._dispatcher.wake_drainers()  # rows a replica that died claimed or put there unnoticed

    @staticmethod
    async def _quietly(what: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # the next round tries again
            logger.exception("%s failed", what)
