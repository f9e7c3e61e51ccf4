"""The queue service's tables, and :class:`QueueStore`, which reads and writes them in domain terms.

The database is the source of truth; the dispatcher keeps an in-memory index of the live part (queues,
pending and leased items) that it rebuilds from here at start. Nothing outside this module sees a
connection or a session.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import JSON, Column, Field, LargeBinary, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, Transition
from takeoff_queue.model import Item, Priority, Queue, SecretMount, SourceKind
from takeoff_queue.resource_config import ResourceKind
from takeoff_queue.run_closes import Revocation, RunClose
from takeoff_server.database import Database
from takeoff_server.group_commit import Batch, GroupCommitter
from takeoff_server.hot_statements import HotStatement
from takeoff_server.idempotency import RequestIds, request_ids_table
from takeoff_server.random_ids import random_bits
from takeoff_server.sqltypes import UtcDateTime

T = TypeVar("T")


class ProjectRow(SQLModel, table=True):
    """A project written to through the queue service. Kept when its queues are deleted: a project, once
    written to, exists for good (common.proto)."""

    __tablename__ = "queue_projects"

    project: str = Field(primary_key=True)
    """``projects/{project}``, as in :attr:`QueueRow.project`."""
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class QueueRow(SQLModel, table=True):
    __tablename__ = "queue_queues"

    name: str = Field(primary_key=True)
    project: str = Field(index=True)
    resource: str
    description: str = ""
    resource_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    template_variables: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prioritization: bool = False
    max_attempts: int = 3
    retry_job_failures: bool = False
    retry_delay_seconds: float = 0.0
    start_timeout_seconds: float = 1800.0
    max_run_seconds: float | None = None
    concurrency_limit: int = 0
    paused: bool = False
    container_name: str = ""
    secure: bool = False
    allow_host_paths: bool = False
    secrets: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """SecretMounts, as ``{"secret", "env", "file"}``."""
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    update_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class ItemRow(SQLModel, table=True):
    __tablename__ = "queue_items"
    __table_args__ = (
        # Each queue's line, in both dispatch orders: the index pages PENDING items in by them (§9).
        sa.Index("ix_queue_items_line", "queue", "state", "seq"),
        sa.Index("ix_queue_items_priority_line", "queue", "state", "priority", "seq"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    """Enqueue order: FIFO within a priority, kept across retries."""
    id: str = Field(index=True, unique=True)
    queue: str = Field(index=True)
    job: str
    job_version: str
    job_version_proto: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    source_kind: str
    run_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    entrypoint: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    resource_config_override: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    template_variables: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    resource_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    priority: int
    state: str = Field(index=True)
    attempt: int = 0
    max_attempts: int
    max_run_seconds: float | None = None
    run_display_name: str = ""
    epoch: int = 0
    completed_epoch: int = 0
    cancel_requested: bool = False
    enqueue_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    eligible_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    update_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    end_time: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    lease_id: str = ""
    agent: str = ""
    assign_time: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    start_deadline: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    running_since: datetime | None = Field(default=None, sa_column=Column(UtcDateTime))
    run: str = ""
    reason: str | None = None
    message: str = ""
    exit_code: int | None = None
    traceparent: str = ""
    relaunched_from: str = ""
    secrets: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    creator: str = ""
    cancelled_by: str = ""
    revision: int = Field(default=0, sa_column=Column(sa.BigInteger, nullable=False, server_default="0"))
    """Replaced by every write of the item's state (``next_revision``); each write names the one it read."""


class AgentLeaseRow(SQLModel, table=True):
    """When each agent's leases expire, by the database's clock: renewed by its heartbeats on whichever
    replica holds its stream, and read by every replica's sweeper (queue replicas only)."""

    __tablename__ = "queue_agents"

    agent_id: str = Field(primary_key=True)
    lease_expiry: datetime = Field(sa_column=Column(UtcDateTime, nullable=False, index=True))
    session_id: str = ""
    """The agent's session whose Hello was committed last: the replica holding any other has a stale one."""


class TransitionRow(SQLModel, table=True):
    __tablename__ = "queue_transitions"

    id: int | None = Field(default=None, primary_key=True)
    item_id: str = Field(index=True)
    time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    from_state: str | None = None
    to_state: str
    reason: str | None = None
    message: str = ""
    agent: str = ""
    attempt: int = 0
    epoch: int = 0
    run: str = ""
    actor: str = ""


class RunCloseRow(SQLModel, table=True):
    """The outbox of docs/design.md §16: a run the queue must close in the registry because it ended the
    run's attempt without the agent. Written in the transaction that records why; deleted in the one that
    records the registry's answer."""

    __tablename__ = "queue_run_closes"

    id: int | None = Field(default=None, primary_key=True)
    run: str
    """``projects/{p}/runs/{run}``"""
    message: str
    reason: str | None = None
    item_id: str = ""
    """The item whose attempt waits for the answer ("" when none does: its queue was deleted)."""
    epoch: int = 0
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    next_try_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False, index=True))
    """Not tried before this: the back-off after a failed try, or the end of a drainer's claim."""
    tries: int = 0
    last_error: str = ""


class TokenRevocationRow(SQLModel, table=True):
    """The outbox of run-token revocations (docs/design.md §13, §16): the run of every attempt that ended,
    whose tokens the registry must revoke. Written in the transaction that ends the attempt; deleted once
    the registry revoked them."""

    __tablename__ = "queue_token_revocations"

    id: int | None = Field(default=None, primary_key=True)
    run: str
    """``projects/{p}/runs/{run}``"""
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    next_try_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False, index=True))
    tries: int = 0
    last_error: str = ""


projects = ProjectRow.__table__  # type: ignore[attr-defined]
queues = QueueRow.__table__  # type: ignore[attr-defined]
items = ItemRow.__table__  # type: ignore[attr-defined]
transitions = TransitionRow.__table__  # type: ignore[attr-defined]
run_closes = RunCloseRow.__table__  # type: ignore[attr-defined]
token_revocations = TokenRevocationRow.__table__  # type: ignore[attr-defined]
agent_leases = AgentLeaseRow.__table__  # type: ignore[attr-defined]
request_ids_rows = request_ids_table("queue_request_ids", SQLModel.metadata)
request_ids = RequestIds(request_ids_rows)

# The statements of the hot path, built once: building one per call (``.values(**row)``) and computing its
# cache key cost more CPU than executing it; on SQLite sqlite3 runs them itself (hot_statements). Each takes
# its values from the parameters it is executed with (an UPDATE sets, an INSERT fills, the columns those
# name); the WHERE clause's parameters are named apart from the columns.
_SAVE_ITEM = HotStatement(
    items.update().where(
        items.c.id == sa.bindparam("where_id"), items.c.revision == sa.bindparam("where_revision")
    )
)
_INSERT_ITEM = HotStatement(items.insert())
_INSERT_TRANSITIONS = HotStatement(transitions.insert())
_INSERT_TOKEN_REVOCATIONS = HotStatement(token_revocations.insert())
_DELETE_TOKEN_REVOCATIONS = token_revocations.delete().where(
    token_revocations.c.id.in_(sa.bindparam("where_ids", expanding=True))
)
_QUEUE_NAMED = sa.select(queues.c.name).where(queues.c.name == sa.bindparam("where_name"))
_QUEUE_EXISTS = HotStatement(_QUEUE_NAMED)
_QUEUE_EXISTS_KEY_SHARE = HotStatement(_QUEUE_NAMED.with_for_update(key_share=True))


def _claim_due(outbox: sa.Table, *answered: sa.ColumnElement[Any]) -> sa.Update:
    """An outbox's claim: its rows due at ``now``, oldest first, at most ``limit``, held until ``hold_until``
    (built once: the token revocations are claimed many times a second under load)."""
    due = (
        sa.select(outbox.c.id)
        .where(outbox.c.next_try_time <= sa.bindparam("now"))
        .order_by(outbox.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    )
    return (
        outbox.update()
        .where(outbox.c.id.in_(due))
        .values(next_try_time=sa.bindparam("hold_until"))
        .returning(*answered)
    )


_CLAIM_RUN_CLOSES = _claim_due(run_closes, *run_closes.c)
_CLAIM_TOKEN_REVOCATIONS = _claim_due(
    token_revocations, token_revocations.c.id, token_revocations.c.run, token_revocations.c.tries
)

LIVE_OR_PENDING = [s.value for s in ItemState if not s.is_terminal]
LIVE = [s.value for s in ItemState if s.is_live]
_REVISION_NONCE_BITS = 20


def next_revision(revision: int) -> int:
    """The revision a write moves an item's row to: one more in the high bits (so a copy read later is
    known to be newer), a random nonce in the low ones. The nonce makes every write's revision its own: a
    write queued behind one of ours, fenced on the revision ours will leave, can never match the same count
    reached by another replica's write instead."""
    return ((revision >> _REVISION_NONCE_BITS) + 1) << _REVISION_NONCE_BITS | random_bits(
        _REVISION_NONCE_BITS
    )


def newer_revision(fresh: int, known: int) -> bool:
    return fresh >> _REVISION_NONCE_BITS > known >> _REVISION_NONCE_BITS


ITEMS_CHANNEL = "takeoff_queue_items"
"""NOTIFY channel of the items each commit wrote: ``{replica}:{id},{id},...``."""
QUEUES_CHANNEL = "takeoff_queue_queues"
"""NOTIFY channel of the queues each commit created, changed or deleted: ``{replica}:{name},...``."""
AGENTS_CHANNEL = "takeoff_queue_agents"
"""NOTIFY channel of the agents whose Hello each commit recorded: ``{replica}:{agent id},...``."""
_NOTIFY_BYTES = 7900
"""PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more."""
ENDED = [s.value for s in ItemState if s.is_terminal]


def ended_attempt_runs(history: Sequence[Transition]) -> list[str]:
    """The runs of the attempts these transitions end (from a live state to any other): their tokens are
    revoked."""
    return [
        t.run for t in history if t.from_state is not None and t.from_state.is_live and not t.to_state.is_live
    ]


@dataclass(frozen=True, slots=True)
class Stored:
    """What the service rebuilds its memory from at start (see :meth:`QueueStore.load`)."""

    projects: list[str]
    queues: list[Queue]
    items: list[Item]
    run_closes: list[RunClose]
    pending: dict[str, int]
    """queue -> how many items it has PENDING, those left out of ``items`` included."""


class Outbox(enum.Enum):
    """The tables of calls to the registry that the queue owes, each drained by a loop of its own
    (:mod:`takeoff_queue.run_closes`)."""

    RUN_CLOSES = "run_closes"
    TOKEN_REVOCATIONS = "token_revocations"


class QueueWrite:
    """One transaction's worth of changes, in domain terms; :meth:`QueueStore.write` runs it."""

    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        self._dialect = batch.connection.dialect.name
        self.items_written: set[str] = set()
        self.queues_written: set[str] = set()
        self.agents_connected: set[str] = set()
        self.filled: set[Outbox] = set()
        """The outboxes this transaction put rows in: their drainers are woken once it commits."""

    async def insert_queue(self, queue: Queue) -> None:
        """The queue, and its project unless that was written to before."""
        self.queues_written.add(queue.name)
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        await self._batch.execute(
            insert(projects)
            .values(project=queue.project, create_time=queue.create_time)
            .on_conflict_do_nothing()
        )
        await self._batch.execute(queues.insert().values(**queue_values(queue)))

    async def update_queue(self, queue: Queue) -> None:
        self.queues_written.add(queue.name)
        await self._batch.execute(
            queues.update().where(queues.c.name == queue.name).values(**queue_values(queue))
        )

    async def delete_queue(self, name: str) -> None:
        """The queue, its items and their transitions."""
        self.queues_written.add(name)
        item_ids = sa.select(items.c.id).where(items.c.queue == name)
        await self._batch.execute(transitions.delete().where(transitions.c.item_id.in_(item_ids)))
        await self._batch.execute(items.delete().where(items.c.queue == name))
        await self._batch.execute(queues.delete().where(queues.c.name == name))

    async def queue_exists(self, name: str) -> bool:
        """Whether the queue is there, kept there until this transaction ends (PostgreSQL: a DeleteQueue
        committing meanwhile waits for it; SQLite has one writer)."""
        query = _QUEUE_EXISTS_KEY_SHARE if self._dialect == "postgresql" else _QUEUE_EXISTS
        found = await self._batch.execute(query, {"where_name": name}, past_appends=True)
        return found.first() is not None

    async def insert_item(self, item: Item) -> int:
        """A new item with its whole history; returns its enqueue sequence number."""
        result = await self._batch.execute(_INSERT_ITEM, _item_values(item), past_appends=True)
        self.items_written.add(item.id)
        self._insert_transitions(item.id, item.life.history)
        seq = result.inserted_primary_key[0] if result.inserted_primary_key else None
        assert seq is not None
        return int(seq)

    async def save_item(
        self, item_id: str, life: ItemLife, update_time: datetime, since: int, *, revision: int, written: int
    ) -> bool:
        """The item's state as ``life`` has it, and its transitions from index ``since`` on, provided the
        row is still at ``revision`` (it moves to ``written``, from :func:`next_revision`). False, writing
        nothing, when another writer (another replica) changed the item first."""
        values = _item_state_values(life, update_time)
        values.update(revision=written, where_id=item_id, where_revision=revision)
        result = await self._batch.execute(_SAVE_ITEM, values, past_appends=True)
        if result.rowcount != 1:
            return False
        self.items_written.add(item_id)
        self._insert_transitions(item_id, life.history[since:])
        self.insert_token_revocations(ended_attempt_runs(life.history[since:]), update_time)
        return True

    async def lock_live_count(self, queue: str) -> int:
        """How many of the queue's items are held under a lease, its row locked until this transaction
        ends so that concurrent claims (other replicas') count one after the other."""
        await self._batch.execute(sa.select(queues.c.name).where(queues.c.name == queue).with_for_update())
        live = sa.select(sa.func.count()).where(items.c.queue == queue, items.c.state.in_(LIVE))
        return int((await self._batch.execute(live)).scalar_one())

    async def bump_revision(self, item_id: str, revision: int, written: int) -> bool:
        """Move the item's row from ``revision`` to ``written`` without changing its state: a change kept
        elsewhere (its attempt's run close) fenced like a write of the item. False when another writer
        changed the item first."""
        result = await self._batch.execute(
            items.update().where(items.c.id == item_id, items.c.revision == revision).values(revision=written)
        )
        if result.rowcount != 1:
            return False
        self.items_written.add(item_id)
        return True

    async def renew_agent_leases(self, agent_id: str, ttl: timedelta, session_id: str = "") -> None:
        """The agent's leases expire ``ttl`` from now by the database's clock (PostgreSQL only). With
        ``session_id`` (its Hello) that session is the agent's now, and the other replicas are told."""
        expiry = sa.func.now() + ttl
        values: dict[str, Any] = {"lease_expiry": expiry}
        if session_id:
            values["session_id"] = session_id
            self.agents_connected.add(agent_id)
        insert = postgresql.insert(agent_leases).values(agent_id=agent_id, **values)
        await self._batch.execute(insert.on_conflict_do_update(index_elements=["agent_id"], set_=values))

    async def agent_lease_expired(self, agent_id: str) -> bool:
        """Whether the agent's leases are expired by the database's clock (PostgreSQL only), its row locked
        until this transaction ends, so that a renewal (its heartbeat through another replica) comes either
        before this answer or after the transaction: a sweeper that read the agent as expired ends no lease
        renewed since. An agent without a row is expired (its expiry was dealt with)."""
        found = await self._batch.execute(
            sa.select(agent_leases.c.lease_expiry < sa.func.now())
            .where(agent_leases.c.agent_id == agent_id)
            .with_for_update()
        )
        expired = found.scalar_one_or_none()
        return expired is None or bool(expired)

    async def forget_agent_lease(self, agent_id: str) -> None:
        """The agent's expiry has been dealt with (it holds no lease): its row goes, unless renewed since."""
        await self._batch.execute(
            agent_leases.delete().where(
                agent_leases.c.agent_id == agent_id, agent_leases.c.lease_expiry < sa.func.now()
            )
        )

    async def announce(self, replica: str) -> None:
        """Tell the other replicas, at this transaction's commit, which items and queues it wrote."""
        for channel, names in (
            (AGENTS_CHANNEL, self.agents_connected),
            (ITEMS_CHANNEL, self.items_written),
            (QUEUES_CHANNEL, self.queues_written),
        ):
            for payload in _payloads(replica, sorted(names)):
                await self._batch.execute(sa.select(sa.func.pg_notify(channel, payload)))

    async def delete_ended_items(self, ended_before: datetime, keep: int, limit: int) -> int:
        """Up to ``limit`` ended items, with their history: those that ended before ``ended_before`` and,
        when ``keep`` is not 0, those beyond the ``keep`` that ended last. An item not ended is never
        chosen, whatever its times."""
        ended = items.c.state.in_(ENDED)
        by_age = sa.select(items.c.id).where(ended, items.c.end_time < ended_before).limit(limit)
        ids = list((await self._batch.execute(by_age)).scalars())
        if keep and len(ids) < limit:
            beyond = (
                sa.select(items.c.id)
                .where(ended)
                .order_by(items.c.end_time.desc(), items.c.seq.desc())
                .offset(keep)
                .limit(limit)
            )
            ids = list(dict.fromkeys([*ids, *(await self._batch.execute(beyond)).scalars()]))[:limit]
        if ids:
            await self._batch.execute(transitions.delete().where(transitions.c.item_id.in_(ids)))
            await self._batch.execute(items.delete().where(items.c.id.in_(ids), ended))
        return len(ids)

    async def forget_request_ids(self, before: datetime) -> int:
        """The request-id records made before ``before``."""
        result = await self._batch.execute(
            request_ids_rows.delete().where(request_ids_rows.c.create_time < before)
        )
        return int(result.rowcount)

    def insert_token_revocations(self, runs: Sequence[str], now: datetime) -> None:
        """Put runs whose attempts ended in the outbox of token revocations, due at once: rows appended to
        the batch, which nothing in the transaction reads back."""
        rows = [
            {"run": run, "create_time": now, "next_try_time": now, "tries": 0, "last_error": ""}
            for run in dict.fromkeys(runs)
            if run
        ]
        if rows:
            self._batch.append(_INSERT_TOKEN_REVOCATIONS, rows)
            self.filled.add(Outbox.TOKEN_REVOCATIONS)

    async def claim_token_revocations(
        self, now: datetime, hold_until: datetime, limit: int
    ) -> list[Revocation]:
        """As :meth:`claim_run_closes`, for the outbox of token revocations."""
        claiming = {"now": now, "hold_until": hold_until, "limit": limit}
        claimed = [
            Revocation(row["run"], row["id"], row["tries"])
            for row in (await self._batch.execute(_CLAIM_TOKEN_REVOCATIONS, claiming)).mappings()
        ]
        return sorted(claimed, key=lambda revocation: revocation.id)

    async def retry_token_revocation(
        self, revocation: Revocation, next_try_time: datetime, error: str
    ) -> None:
        await self._batch.execute(
            token_revocations.update()
            .where(token_revocations.c.id == revocation.id)
            .values(next_try_time=next_try_time, tries=revocation.tries + 1, last_error=error)
        )

    async def delete_token_revocations(self, revocation_ids: Sequence[int]) -> None:
        await self._batch.execute(_DELETE_TOKEN_REVOCATIONS, {"where_ids": revocation_ids})

    async def insert_run_closes(self, closes: Sequence[RunClose], now: datetime) -> list[RunClose]:
        """Put runs in the outbox, due at once; returns them with their row ids. Their attempts are over,
        so their run tokens are revoked too."""
        self.insert_token_revocations([close.run for close in closes], now)
        stored = []
        for close in closes:
            result = await self._batch.execute(
                run_closes.insert().values(**_run_close_values(close), create_time=now, next_try_time=now)
            )
            assert result.inserted_primary_key is not None
            stored.append(replace(close, id=int(result.inserted_primary_key[0])))
            self.filled.add(Outbox.RUN_CLOSES)
        return stored

    async def delete_run_close(self, close_id: int) -> None:
        """The registry answered: the run is closed."""
        await self._batch.execute(run_closes.delete().where(run_closes.c.id == close_id))

    async def claim_run_closes(self, now: datetime, hold_until: datetime, limit: int) -> list[RunClose]:
        """The outbox rows due now, oldest first, kept from every other drainer until ``hold_until``. One
        statement picks and claims them: PostgreSQL skips rows another transaction is claiming instead of
        waiting for them; SQLite runs one writing statement at a time."""
        claiming = {"now": now, "hold_until": hold_until, "limit": limit}
        rows = (await self._batch.execute(_CLAIM_RUN_CLOSES, claiming)).mappings()
        claimed = [_run_close_from_row(dict(row)) for row in rows]
        return sorted(claimed, key=lambda close: close.id)

    async def retry_run_close(self, close: RunClose, next_try_time: datetime, error: str) -> None:
        """The try failed: the row waits until ``next_try_time``, one more try counted."""
        await self._batch.execute(
            run_closes.update()
            .where(run_closes.c.id == close.id)
            .values(next_try_time=next_try_time, tries=close.tries + 1, last_error=error)
        )

    async def replay(self, scope: str, request_id: str, fingerprint: str) -> str | None:
        """Like :meth:`QueueStore.replay`, in this transaction: it sees what this transaction remembered.
        Its session and :meth:`remember`'s pass the batch's appended rows: request ids are neither table."""
        return await request_ids.replay(
            AsyncSession(bind=self._batch.connection),
            scope=scope,
            request_id=request_id,
            fingerprint=fingerprint,
        )

    async def remember(self, scope: str, request_id: str, fingerprint: str, result: str) -> None:
        """Record what ``request_id`` made, in this transaction (see :mod:`takeoff_server.idempotency`)."""
        await request_ids.remember(
            AsyncSession(bind=self._batch.connection),
            scope=scope,
            request_id=request_id,
            fingerprint=fingerprint,
            result=result,
        )

    def _insert_transitions(self, item_id: str, history: Sequence[Transition]) -> None:
        rows = [
            {
                "item_id": item_id,
                "time": t.time,
                "from_state": t.from_state.value if t.from_state else None,
                "to_state": t.to_state.value,
                "reason": t.reason.value if t.reason else None,
                "message": t.message,
                "agent": t.agent,
                "attempt": t.attempt,
                "epoch": t.epoch,
                "run": t.run,
                "actor": t.actor,
            }
            for t in history
        ]
        self._batch.append(_INSERT_TRANSITIONS, rows)


class QueueStore:
    """The queue service's persistence in domain terms. Writes go through group commit: many changes
    share one transaction, and nobody hears of a change before it is committed."""

    def __init__(self, database: Database, *, replica: str = "") -> None:
        self._database = database
        self._committer = GroupCommitter(database)
        self._renewals = GroupCommitter(database)
        """Agents' lease renewals commit apart from item writes: an item write waiting on a row another
        replica holds locked must never hold back a Heartbeat's Ack."""
        self.replica = replica
        """This replica's name when several share the database (PostgreSQL): every write is announced
        to the others (NOTIFY); "" for a queue that owns its database."""
        self._drainers: dict[Outbox, Callable[[], None]] = {}

    def drain_with(self, outbox: Outbox, wake: Callable[[], None]) -> None:
        """``wake`` is called after each commit that put rows in ``outbox``, and after no other: a drainer
        looks at its outbox when there is something new in it (or a row it knows of comes due), never
        after every write."""
        self._drainers[outbox] = wake

    async def write(self, changes: Callable[[QueueWrite], Awaitable[T]]) -> T:
        """Run ``changes`` in a transaction (shared with other writers) and return once it is committed."""

        async def work(batch: Batch) -> tuple[T, set[Outbox]]:
            tx = QueueWrite(batch)
            result = await changes(tx)
            if self.replica:
                await tx.announce(self.replica)
            return result, tx.filled

        result, filled = await self._committer.commit(work)
        for outbox in filled:
            if outbox in self._drainers:
                self._drainers[outbox]()
        return result

    async def renew_agent_lease(self, agent_id: str, ttl: timedelta, session_id: str = "") -> None:
        """See :meth:`QueueWrite.renew_agent_leases`; committed (and announced) on its own."""

        async def work(batch: Batch) -> None:
            tx = QueueWrite(batch)
            await tx.renew_agent_leases(agent_id, ttl, session_id)
            await tx.announce(self.replica)

        await self._renewals.commit(work)

    async def replay(self, scope: str, request_id: str, fingerprint: str) -> str | None:
        """What an earlier request with this id made, or None for a new one (see
        :meth:`takeoff_server.idempotency.RequestIds.replay`)."""
        async with self._database.session() as session:
            return await request_ids.replay(
                session, scope=scope, request_id=request_id, fingerprint=fingerprint
            )

    async def load(self, window: int | None = None) -> Stored:
        """Every project written to, every queue, every item held under a lease and, of each queue's
        PENDING items, the first ``window`` in dispatch order (all of them with None), each item with its
        history; and how many items each queue has PENDING (docs/design.md §9 "The queue's in-memory
        index")."""
        async with self._database.engine.connect() as connection:
            found_queues = [
                _queue_from_row(dict(row)) for row in (await connection.execute(sa.select(queues))).mappings()
            ]
            # After the queues: each queue's project was committed with it, so it is among these.
            found_projects = list((await connection.execute(sa.select(projects.c.project))).scalars())
            if window is None:
                unfinished = await _fetch_items(connection, states=LIVE_OR_PENDING)
            else:
                unfinished = await _fetch_items(connection, states=LIVE)
                for queue in found_queues:
                    unfinished += (await _pending_page(connection, queue, None, window))[0]
            counted = await connection.execute(_PENDING_BY_QUEUE)
            pending = {queue: int(count) for queue, count in counted.tuples()}
            closes = await connection.execute(sa.select(run_closes).order_by(run_closes.c.id))
            waiting = [_run_close_from_row(dict(row)) for row in closes.mappings()]
        rows = sorted(unfinished, key=lambda row: row["seq"])
        return Stored(found_projects, found_queues, [_item_from_row(row) for row in rows], waiting, pending)

    async def pending_page(
        self, queue: Queue, after: LineKey | None, limit: int
    ) -> tuple[list[Item], LineKey | None]:
        """The queue's next ``limit`` PENDING items in dispatch order after ``after`` (from the first with
        None), each with its history; and the key the page reached, or None when it read to the line's
        end. The key comes from the line's index, so an item that ended between the page's two reads
        (absent from the items) does not end the line early."""
        async with self._database.engine.connect() as connection:
            rows, reached = await _pending_page(connection, queue, after, limit)
        return [_item_from_row(row) for row in rows], reached

    async def last_pending_key(self, queue: Queue) -> LineKey | None:
        """The key of the queue's last PENDING item in dispatch order (None: it has none), off the line's
        index."""
        async with self._database.engine.connect() as connection:
            found = (await connection.execute(_last(queue.prioritization), {"queue": queue.name})).first()
        if found is None:
            return None
        return (found.priority if queue.prioritization else 0, found.seq)

    async def pending_ahead(self, queue: Queue, after: LineKey | None, keys: Sequence[LineKey]) -> list[int]:
        """For each of ``keys`` (in dispatch order), how many of the queue's PENDING items sort after
        ``after`` and before it. One range count per gap between two keys, so the rows counted in all are
        those up to the last key, once."""
        counts, total, low, inclusive = [], 0, after, False
        async with self._database.engine.connect() as connection:
            for key in keys:
                for conditions, values in _spans(queue.prioritization, low, inclusive, key):
                    counted = await connection.execute(_count(conditions), {"queue": queue.name, **values})
                    total += int(counted.scalar_one())
                counts.append(total)
                low, inclusive = key, True
        return counts

    async def claim_run_closes(self, now: datetime, hold_until: datetime, limit: int) -> list[RunClose]:
        """See :meth:`QueueWrite.claim_run_closes`; committed before the calls it claims for are made."""

        async def claim(tx: QueueWrite) -> list[RunClose]:
            return await tx.claim_run_closes(now, hold_until, limit)

        return await self.write(claim)

    async def retry_run_close(self, close: RunClose, next_try_time: datetime, error: str) -> None:
        async def postpone(tx: QueueWrite) -> None:
            await tx.retry_run_close(close, next_try_time, error)

        await self.write(postpone)

    async def next_run_close_time(self) -> datetime | None:
        """When the next outbox row is due (None: the outbox is empty)."""
        async with self._database.engine.connect() as connection:
            return (await connection.execute(sa.select(sa.func.min(run_closes.c.next_try_time)))).scalar()

    async def claim_token_revocations(
        self, now: datetime, hold_until: datetime, limit: int
    ) -> list[Revocation]:
        async def claim(tx: QueueWrite) -> list[Revocation]:
            return await tx.claim_token_revocations(now, hold_until, limit)

        return await self.write(claim)

    async def retry_token_revocations(
        self, retries: Sequence[tuple[Revocation, datetime]], error: str
    ) -> None:
        """Each revocation tried again at its own time, in one transaction."""

        async def postpone(tx: QueueWrite) -> None:
            for revocation, next_try_time in retries:
                await tx.retry_token_revocation(revocation, next_try_time, error)

        await self.write(postpone)

    async def tokens_revoked(self, revocations: Sequence[Revocation]) -> None:
        async def forget(tx: QueueWrite) -> None:
            await tx.delete_token_revocations([revocation.id for revocation in revocations])

        await self.write(forget)

    async def next_token_revocation_time(self) -> datetime | None:
        async with self._database.engine.connect() as connection:
            query = sa.select(sa.func.min(token_revocations.c.next_try_time))
            return (await connection.execute(query)).scalar()

    async def token_revocations(self) -> list[str]:
        """The runs whose tokens wait to be revoked, oldest first."""
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(token_revocations.c.run).order_by(token_revocations.c.id)
            )
            return list(rows.scalars())

    async def run_closes(self) -> list[RunClose]:
        """Every row of the outbox, oldest first."""
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(sa.select(run_closes).order_by(run_closes.c.id))
            return [_run_close_from_row(dict(row)) for row in rows.mappings()]

    async def items(
        self,
        *,
        item_ids: Sequence[str] | None = None,
        queue: str | None = None,
        project: str | None = None,
        states: Sequence[ItemState] = (),
        job: str | None = None,
        id_prefix: str | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
        agent: str | None = None,
    ) -> list[Item]:
        """Items newest first, each with its history."""
        async with self._database.engine.connect() as connection:
            rows = await _fetch_items(
                connection,
                item_ids=item_ids,
                agent=agent,
                queue=queue,
                project=project,
                states=[state.value for state in states],
                job=job,
                id_prefix=id_prefix,
                before_seq=before_seq,
                limit=limit,
            )
        return [_item_from_row(row) for row in rows]

    async def run_closes_of(self, item_ids: Sequence[str]) -> list[RunClose]:
        """The outbox rows of these items' attempts."""
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(sa.select(run_closes).where(run_closes.c.item_id.in_(item_ids)))
            return [_run_close_from_row(dict(row)) for row in rows.mappings()]

    async def revisions(self) -> dict[str, int]:
        """Every item not yet ended, by id, with the revision of its row."""
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(items.c.id, items.c.revision).where(items.c.state.in_(LIVE_OR_PENDING))
            )
            return dict(rows.tuples().all())

    async def queues(self) -> list[Queue]:
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(sa.select(queues))
            return [_queue_from_row(dict(row)) for row in rows.mappings()]

    async def queue(self, name: str) -> Queue | None:
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(sa.select(queues).where(queues.c.name == name))
            row = rows.mappings().first()
            return _queue_from_row(dict(row)) if row is not None else None

    async def agent_session(self, agent_id: str) -> str | None:
        """The session of the agent whose Hello was committed last, by any replica."""
        async with self._database.engine.connect() as connection:
            found = await connection.execute(
                sa.select(agent_leases.c.session_id).where(agent_leases.c.agent_id == agent_id)
            )
            return found.scalar_one_or_none()

    async def expired_agents(self) -> list[str]:
        """Agents whose leases expired by the database's clock (PostgreSQL only)."""
        async with self._database.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(agent_leases.c.agent_id).where(agent_leases.c.lease_expiry < sa.func.now())
            )
            return list(rows.scalars())

    async def count_items_by_state(self, queue: str) -> dict[ItemState, int]:
        async with self._database.engine.connect() as connection:
            result = await connection.execute(
                sa.select(items.c.state, sa.func.count())
                .where(items.c.queue == queue)
                .group_by(items.c.state)
            )
            return {ItemState(state): count for state, count in result.tuples()}


async def _fetch_items(
    connection: AsyncConnection,
    *,
    item_ids: Sequence[str] | None = None,
    agent: str | None = None,
    queue: str | None = None,
    project: str | None = None,
    states: Sequence[str] = (),
    job: str | None = None,
    id_prefix: str | None = None,
    before_seq: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Item rows newest first, each with its ``transitions`` (oldest first).

    One statement reads both, so each item's state and history come from one snapshot: read apart, a
    commit landing between them shows an item whose history is ahead of its state (docs/design.md §5).
    """
    parameters: dict[str, Any] = {}
    if item_ids is not None:
        parameters["item_ids"] = list(item_ids)
    if agent is not None:
        parameters["agent"] = agent
    if queue is not None:
        parameters["queue"] = queue
    if project is not None:
        parameters["queue_prefix"] = f"{project}/queues/"
    if states:
        parameters["states"] = list(states)
    if job is not None:
        if "/versions/" in job:
            parameters["job_version"] = job
        else:
            parameters["job_version_prefix"] = f"{job}/versions/"
    if id_prefix is not None:
        # A range on the unique index of ids rather than LIKE, which PostgreSQL indexes only under the C
        # collation. Exact for hex ids and a hex prefix: every id starting with it sorts before prefix + "g".
        parameters["id_from"], parameters["id_before"] = id_prefix, f"{id_prefix}g"
    if before_seq is not None:
        parameters["before_seq"] = before_seq
    if limit is not None:
        parameters["limit"] = limit
    found: dict[str, dict[str, Any]] = {}
    query = _items_with_history(frozenset(parameters))
    for joined in (await connection.execute(query, parameters)).mappings():
        row = found.get(joined["id"])
        if row is None:
            row = found[joined["id"]] = {name: joined[name] for name in _ITEM_COLUMNS}
            row["transitions"] = []
        if joined["transition_id"] is not None:
            row["transitions"].append({name: joined[f"transition_{name}"] for name in _TRANSITION_COLUMNS})
    return list(found.values())


_ITEM_COLUMNS = tuple(items.c.keys())
_TRANSITION_COLUMNS = tuple(transitions.c.keys())


@functools.cache
def _items_with_history(filters: frozenset[str]) -> sa.Select[Any]:
    """:func:`_fetch_items`'s statement for the filters named (its parameters), built once for each set:
    building it (the subquery's column proxies) cost more CPU than running it, at every GetItem and
    WatchItem."""
    query = sa.select(items).order_by(items.c.seq.desc())
    if "item_ids" in filters:
        query = query.where(items.c.id.in_(sa.bindparam("item_ids", expanding=True)))
    if "agent" in filters:
        query = query.where(items.c.agent == sa.bindparam("agent"))
    if "queue" in filters:
        query = query.where(items.c.queue == sa.bindparam("queue"))
    if "queue_prefix" in filters:
        query = query.where(items.c.queue.startswith(sa.bindparam("queue_prefix")))
    if "states" in filters:
        query = query.where(items.c.state.in_(sa.bindparam("states", expanding=True)))
    if "job_version" in filters:
        query = query.where(items.c.job_version == sa.bindparam("job_version"))
    if "job_version_prefix" in filters:
        query = query.where(items.c.job_version.startswith(sa.bindparam("job_version_prefix")))
    if "id_from" in filters:
        query = query.where(items.c.id >= sa.bindparam("id_from"), items.c.id < sa.bindparam("id_before"))
    if "before_seq" in filters:
        query = query.where(items.c.seq < sa.bindparam("before_seq"))
    if "limit" in filters:
        query = query.limit(sa.bindparam("limit", type_=sa.Integer))
    chosen = query.subquery("chosen")
    return (
        sa.select(chosen, *(column.label(f"transition_{column.name}") for column in transitions.c))
        .outerjoin(transitions, transitions.c.item_id == chosen.c.id)
        .order_by(chosen.c.seq.desc(), transitions.c.id)
    )


LineKey = tuple[int, int]
"""An item's place in its queue's dispatch order: (priority rank, enqueue seq); the rank is the item's
priority in a queue that prioritizes, else 0."""

_PENDING_BY_QUEUE = (
    sa.select(items.c.queue, sa.func.count())
    .where(items.c.state == ItemState.PENDING.value)
    .group_by(items.c.queue)
)


async def _pending_page(
    connection: AsyncConnection, queue: Queue, after: LineKey | None, limit: int
) -> tuple[list[dict[str, Any]], LineKey | None]:
    """Rows of the queue's first ``limit`` PENDING items after ``after``, with their transitions, and the
    key of the last one the line's index gave (None: fewer than ``limit``, the line's end). The ids come
    from the index, then the rows (one statement, so each comes with its own history)."""
    line: list[Any] = []
    for conditions, values in _spans(queue.prioritization, after, False, None):
        parameters = {"queue": queue.name, "limit": limit - len(line), **values}
        line += (await connection.execute(_ids(conditions, queue.prioritization), parameters)).all()
        if len(line) == limit:
            break
    if not line:
        return [], None
    last = line[-1]
    reached = (last.priority if queue.prioritization else 0, last.seq) if len(line) == limit else None
    ids = [found.id for found in line]
    rows = await _fetch_items(connection, item_ids=ids, states=[ItemState.PENDING.value])
    place = {item_id: index for index, item_id in enumerate(ids)}
    return sorted(rows, key=lambda row: place[row["id"]]), reached


Span = tuple[frozenset[str], dict[str, int]]
"""Conditions on a queue's PENDING items that one index range answers (names from ``_CONDITIONS``), with
their values."""

_CONDITIONS = {
    "priority =": items.c.priority == sa.bindparam("priority"),
    "priority >": items.c.priority > sa.bindparam("low_priority"),
    "priority <": items.c.priority < sa.bindparam("high_priority"),
    "seq >": items.c.seq > sa.bindparam("low_seq"),
    "seq >=": items.c.seq >= sa.bindparam("low_seq"),
    "seq <": items.c.seq < sa.bindparam("high_seq"),
}


def _spans(prioritized: bool, low: LineKey | None, inclusive: bool, high: LineKey | None) -> list[Span]:
    """The part of a queue's line after ``low`` (or from it, ``inclusive``; from the start with None) and
    before ``high`` (to the end with None), in dispatch order, as ranges of the line's indexes. A range of
    a prioritized line is cut at each priority it spans: with ``(priority, seq) > (p, s)`` SQLite bounds
    the index by the priority alone and walks every item of priority p before s (review F5)."""
    after = "seq >=" if inclusive else "seq >"
    if not prioritized:
        conditions, values = set(), {}
        if low is not None:
            conditions.add(after)
            values["low_seq"] = low[1]
        if high is not None:
            conditions.add("seq <")
            values["high_seq"] = high[1]
        return [(frozenset(conditions), values)]
    if low is None:
        if high is None:
            return [(frozenset(), {})]
        return [
            (frozenset({"priority <"}), {"high_priority": high[0]}),
            (frozenset({"priority =", "seq <"}), {"priority": high[0], "high_seq": high[1]}),
        ]
    if high is not None and high[0] == low[0]:
        values = {"priority": low[0], "low_seq": low[1], "high_seq": high[1]}
        return [(frozenset({"priority =", after, "seq <"}), values)]
    if high is not None and high[0] < low[0]:
        return []
    spans: list[Span] = [(frozenset({"priority =", after}), {"priority": low[0], "low_seq": low[1]})]
    if high is None:
        return [*spans, (frozenset({"priority >"}), {"low_priority": low[0]})]
    return [
        *spans,
        (frozenset({"priority >", "priority <"}), {"low_priority": low[0], "high_priority": high[0]}),
        (frozenset({"priority =", "seq <"}), {"priority": high[0], "high_seq": high[1]}),
    ]


_IN_QUEUE_PENDING = sa.and_(items.c.queue == sa.bindparam("queue"), items.c.state == ItemState.PENDING.value)


@functools.cache
def _ids(conditions: frozenset[str], prioritized: bool) -> sa.Select[Any]:
    """The first ``limit`` ids (with their keys) of one span of a queue's line, in dispatch order."""
    order = (items.c.priority, items.c.seq) if prioritized else (items.c.seq,)
    query = sa.select(items.c.id, items.c.priority, items.c.seq).where(
        _IN_QUEUE_PENDING, *(_CONDITIONS[name] for name in sorted(conditions))
    )
    return query.order_by(*order).limit(sa.bindparam("limit", type_=sa.Integer))


@functools.cache
def _last(prioritized: bool) -> sa.Select[Any]:
    order = (items.c.priority.desc(), items.c.seq.desc()) if prioritized else (items.c.seq.desc(),)
    return sa.select(items.c.priority, items.c.seq).where(_IN_QUEUE_PENDING).order_by(*order).limit(1)


@functools.cache
def _count(conditions: frozenset[str]) -> sa.Select[Any]:
    """How many items one span of a queue's line holds."""
    return (
        sa.select(sa.func.count())
        .select_from(items)
        .where(_IN_QUEUE_PENDING, *(_CONDITIONS[name] for name in sorted(conditions)))
    )


def _payloads(replica: str, names: Sequence[str]) -> list[str]:
    """``{replica}:{name},{name},...`` messages, each under PostgreSQL's size limit."""
    payloads, names_in, size = [], list[str](), len(replica) + 1
    for name in names:
        if names_in and size + len(name) + 1 > _NOTIFY_BYTES:
            payloads.append(f"{replica}:{','.join(names_in)}")
            names_in, size = [], len(replica) + 1
        names_in.append(name)
        size += len(name) + 1
    if names_in:
        payloads.append(f"{replica}:{','.join(names_in)}")
    return payloads


def queue_values(queue: Queue) -> dict[str, Any]:
    return {
        "name": queue.name,
        "project": queue.project,
        "resource": queue.resource.value,
        "description": queue.description,
        "resource_config": queue.resource_config,
        "template_variables": queue.template_variables,
        "prioritization": queue.prioritization,
        "max_attempts": queue.max_attempts,
        "retry_job_failures": queue.retry_job_failures,
        "retry_delay_seconds": queue.retry_delay.total_seconds(),
        "start_timeout_seconds": (queue.start_timeout or timedelta(0)).total_seconds(),
        "max_run_seconds": queue.max_run_time.total_seconds() if queue.max_run_time else None,
        "concurrency_limit": queue.concurrency_limit,
        "paused": queue.paused,
        "container_name": queue.container_name,
        "secure": queue.secure,
        "allow_host_paths": queue.allow_host_paths,
        "secrets": [mount.as_json() for mount in queue.secrets],
        "create_time": queue.create_time,
        "update_time": queue.update_time,
    }


def _queue_from_row(row: dict[str, Any]) -> Queue:
    return Queue(
        name=row["name"],
        resource=ResourceKind(row["resource"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        description=row["description"],
        resource_config=row["resource_config"],
        template_variables=row["template_variables"],
        prioritization=row["prioritization"],
        max_attempts=row["max_attempts"],
        retry_job_failures=row["retry_job_failures"],
        retry_delay=timedelta(seconds=row["retry_delay_seconds"]),
        start_timeout=timedelta(seconds=row["start_timeout_seconds"]),
        max_run_time=timedelta(seconds=row["max_run_seconds"]) if row["max_run_seconds"] else None,
        concurrency_limit=row["concurrency_limit"],
        paused=row["paused"],
        container_name=row["container_name"],
        secure=row["secure"],
        allow_host_paths=row["allow_host_paths"],
        secrets=tuple(SecretMount.from_json(mount) for mount in row["secrets"]),
    )


def _item_state_values(life: ItemLife, update_time: datetime) -> dict[str, Any]:
    """The columns that change over an item's life."""
    return {
        "state": life.state.value,
        "attempt": life.attempt,
        "epoch": life.epoch,
        "completed_epoch": life.completed_epoch,
        "cancel_requested": life.cancel_requested,
        "eligible_time": life.eligible_time,
        "update_time": update_time,
        "end_time": life.end_time,
        "lease_id": life.lease_id,
        "agent": life.agent,
        "assign_time": life.assign_time,
        "start_deadline": life.start_deadline,
        "running_since": life.running_since,
        "run": life.run,
        "reason": life.reason.value if life.reason else None,
        "message": life.message,
        "exit_code": life.exit_code,
        "cancelled_by": life.cancelled_by,
    }


def _item_values(item: Item) -> dict[str, Any]:
    """Every column, for the insert at Enqueue."""
    return {
        **_item_state_values(item.life, item.update_time or item.life.enqueue_time),
        "id": item.id,
        "queue": item.queue,
        "job": item.job,
        "job_version": item.job_version,
        "job_version_proto": item.job_version_proto,
        "source_kind": item.source_kind.value,
        "run_config": item.run_config,
        "entrypoint": item.entrypoint,
        "resource_config_override": item.resource_config_override,
        "template_variables": item.template_variables,
        "resource_config": item.resource_config,
        "priority": int(item.priority),
        "max_attempts": item.life.max_attempts,
        "max_run_seconds": item.max_run_time.total_seconds() if item.max_run_time else None,
        "run_display_name": item.run_display_name,
        "enqueue_time": item.life.enqueue_time,
        "traceparent": item.traceparent,
        "relaunched_from": item.relaunched_from,
        "secrets": [mount.as_json() for mount in item.secrets],
        "creator": item.creator,
    }


def _run_close_values(close: RunClose) -> dict[str, Any]:
    return {
        "run": close.run,
        "message": close.message,
        "reason": close.reason.value if close.reason else None,
        "item_id": close.item_id,
        "epoch": close.epoch,
    }


def _run_close_from_row(row: dict[str, Any]) -> RunClose:
    return RunClose(
        run=row["run"],
        message=row["message"],
        reason=FailureReason(row["reason"]) if row["reason"] else None,
        item_id=row["item_id"],
        epoch=row["epoch"],
        id=row["id"],
        tries=row["tries"],
    )


def _transition_from_row(row: dict[str, Any]) -> Transition:
    return Transition(
        time=row["time"],
        from_state=ItemState(row["from_state"]) if row["from_state"] else None,
        to_state=ItemState(row["to_state"]),
        attempt=row["attempt"],
        epoch=row["epoch"],
        reason=FailureReason(row["reason"]) if row["reason"] else None,
        message=row["message"],
        agent=row["agent"],
        run=row["run"],
        actor=row["actor"],
    )


def _item_from_row(row: dict[str, Any]) -> Item:
    life = ItemLife(
        item_id=row["id"],
        state=ItemState(row["state"]),
        max_attempts=row["max_attempts"],
        enqueue_time=row["enqueue_time"],
        eligible_time=row["eligible_time"],
        attempt=row["attempt"],
        epoch=row["epoch"],
        cancel_requested=row["cancel_requested"],
        agent=row["agent"],
        run=row["run"],
        reason=FailureReason(row["reason"]) if row["reason"] else None,
        message=row["message"],
        exit_code=row["exit_code"],
        lease_id=row["lease_id"],
        assign_time=row["assign_time"],
        start_deadline=row["start_deadline"],
        running_since=row["running_since"],
        completed_epoch=row["completed_epoch"],
        end_time=row["end_time"],
        cancelled_by=row["cancelled_by"],
        history=tuple(_transition_from_row(t) for t in row.get("transitions", ())),
    )
    return Item(
        id=row["id"],
        queue=row["queue"],
        job=row["job"],
        job_version=row["job_version"],
        job_version_proto=row["job_version_proto"],
        source_kind=SourceKind(row["source_kind"]),
        run_config=row["run_config"],
        entrypoint=row["entrypoint"],
        resource_config_override=row["resource_config_override"],
        template_variables=row["template_variables"],
        resource_config=row["resource_config"],
        priority=Priority(row["priority"]),
        life=life,
        max_run_time=timedelta(seconds=row["max_run_seconds"]) if row["max_run_seconds"] else None,
        run_display_name=row["run_display_name"],
        traceparent=row["traceparent"],
        relaunched_from=row["relaunched_from"],
        secrets=tuple(SecretMount.from_json(mount) for mount in row["secrets"]),
        creator=row["creator"],
        seq=row["seq"],
        update_time=row["update_time"],
        committed=life,
        revision=row["revision"],
    )
