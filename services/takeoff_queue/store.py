"""The queue service's tables and the queries on them.

The database is the source of truth; the dispatcher keeps an in-memory index of the live part (queues,
pending and leased items) that it rebuilds from here at start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import JSON, Column, Field, LargeBinary, SQLModel

from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, Transition
from takeoff_queue.model import Item, Priority, Queue, SourceKind
from takeoff_queue.resource_config import ResourceKind
from takeoff_server.idempotency import RequestIds, request_ids_table
from takeoff_server.sqltypes import UtcDateTime


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
    create_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    update_time: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class ItemRow(SQLModel, table=True):
    __tablename__ = "queue_items"

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


queues = QueueRow.__table__  # type: ignore[attr-defined]
items = ItemRow.__table__  # type: ignore[attr-defined]
transitions = TransitionRow.__table__  # type: ignore[attr-defined]
request_ids = RequestIds(request_ids_table("queue_request_ids", SQLModel.metadata))

ITEM_DYNAMIC_COLUMNS = (
    "state",
    "attempt",
    "epoch",
    "completed_epoch",
    "cancel_requested",
    "eligible_time",
    "update_time",
    "end_time",
    "lease_id",
    "agent",
    "assign_time",
    "start_deadline",
    "running_since",
    "run",
    "reason",
    "message",
    "exit_code",
)
LIVE_OR_PENDING = [s.value for s in ItemState if not s.is_terminal]


async def insert_queue(connection: AsyncConnection, row: dict[str, Any]) -> None:
    await connection.execute(queues.insert().values(**row))


async def update_queue(connection: AsyncConnection, name: str, values: dict[str, Any]) -> None:
    await connection.execute(queues.update().where(queues.c.name == name).values(**values))


async def delete_queue(connection: AsyncConnection, name: str) -> None:
    item_ids = sa.select(items.c.id).where(items.c.queue == name)
    await connection.execute(transitions.delete().where(transitions.c.item_id.in_(item_ids)))
    await connection.execute(items.delete().where(items.c.queue == name))
    await connection.execute(queues.delete().where(queues.c.name == name))


async def load_queues(connection: AsyncConnection) -> list[dict[str, Any]]:
    result = await connection.execute(sa.select(queues))
    return [dict(row) for row in result.mappings()]


async def load_unfinished_items(connection: AsyncConnection) -> list[dict[str, Any]]:
    result = await connection.execute(
        sa.select(items).where(items.c.state.in_(LIVE_OR_PENDING)).order_by(items.c.seq)
    )
    return [dict(row) for row in result.mappings()]


async def insert_item(connection: AsyncConnection, row: dict[str, Any], history: Sequence[Transition]) -> int:
    result = await connection.execute(items.insert().values(**row))
    await insert_transitions(connection, row["id"], history)
    seq = result.inserted_primary_key[0] if result.inserted_primary_key else None
    assert seq is not None
    return int(seq)


async def save_item(
    connection: AsyncConnection, item_id: str, values: dict[str, Any], history: Sequence[Transition]
) -> None:
    await connection.execute(items.update().where(items.c.id == item_id).values(**values))
    await insert_transitions(connection, item_id, history)


async def insert_transitions(
    connection: AsyncConnection, item_id: str, history: Iterable[Transition]
) -> None:
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
        }
        for t in history
    ]
    if rows:
        await connection.execute(transitions.insert(), rows)


async def fetch_items(
    connection: AsyncConnection,
    *,
    item_ids: Sequence[str] | None = None,
    queue: str | None = None,
    project: str | None = None,
    states: Sequence[str] = (),
    job: str | None = None,
    before_seq: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Items newest first, each with its ``transitions`` (oldest first)."""
    query = sa.select(items).order_by(items.c.seq.desc())
    if item_ids is not None:
        query = query.where(items.c.id.in_(item_ids))
    if queue is not None:
        query = query.where(items.c.queue == queue)
    if project is not None:
        query = query.where(items.c.queue.startswith(f"{project}/queues/"))
    if states:
        query = query.where(items.c.state.in_(states))
    if job is not None:
        versions = items.c.job_version
        query = query.where(
            versions == job if "/versions/" in job else versions.startswith(f"{job}/versions/")
        )
    if before_seq is not None:
        query = query.where(items.c.seq < before_seq)
    if limit is not None:
        query = query.limit(limit)
    found = [dict(row) for row in (await connection.execute(query)).mappings()]
    if found:
        history = await connection.execute(
            sa.select(transitions)
            .where(transitions.c.item_id.in_([row["id"] for row in found]))
            .order_by(transitions.c.id)
        )
        by_item: dict[str, list[dict[str, Any]]] = {row["id"]: [] for row in found}
        for transition in history.mappings():
            by_item[transition["item_id"]].append(dict(transition))
        for row in found:
            row["transitions"] = by_item[row["id"]]
    return found


async def count_items_by_state(connection: AsyncConnection, queue: str) -> dict[str, int]:
    result = await connection.execute(
        sa.select(items.c.state, sa.func.count()).where(items.c.queue == queue).group_by(items.c.state)
    )
    return {state: count for state, count in result.tuples()}


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
        "start_timeout_seconds": queue.start_timeout.total_seconds(),
        "max_run_seconds": queue.max_run_time.total_seconds() if queue.max_run_time else None,
        "concurrency_limit": queue.concurrency_limit,
        "paused": queue.paused,
        "container_name": queue.container_name,
        "create_time": queue.create_time,
        "update_time": queue.update_time,
    }


def queue_from_row(row: dict[str, Any]) -> Queue:
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
    )


def item_state_values(item: Item) -> dict[str, Any]:
    """The columns that change over an item's life."""
    life = item.life
    return {
        "state": life.state.value,
        "attempt": life.attempt,
        "epoch": life.epoch,
        "completed_epoch": item.completed_epoch,
        "cancel_requested": life.cancel_requested,
        "eligible_time": life.eligible_time,
        "update_time": item.update_time or item.life.enqueue_time,
        "end_time": item.end_time,
        "lease_id": item.lease_id,
        "agent": life.agent,
        "assign_time": item.assign_time,
        "start_deadline": item.start_deadline,
        "running_since": item.running_since,
        "run": life.run,
        "reason": life.reason.value if life.reason else None,
        "message": life.message,
        "exit_code": life.exit_code,
    }


def item_values(item: Item) -> dict[str, Any]:
    """Every column, for the insert at Enqueue."""
    return {
        **item_state_values(item),
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
    }


def transition_from_row(row: dict[str, Any]) -> Transition:
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
    )


def item_from_row(row: dict[str, Any]) -> Item:
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
        seq=row["seq"],
        update_time=row["update_time"],
        end_time=row["end_time"],
        lease_id=row["lease_id"],
        assign_time=row["assign_time"],
        start_deadline=row["start_deadline"],
        running_since=row["running_since"],
        completed_epoch=row["completed_epoch"],
        history=[transition_from_row(t) for t in row.get("transitions", ())],
    )
