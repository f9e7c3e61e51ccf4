"""gRPC servicer of the queue service: protos in, domain calls, protos out.

The Lease stream is two flows: a reader task hands each agent message to the dispatcher, and the
handler writes whatever the dispatcher puts in the session's outbox (Welcome, Assignments, Acks, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_queue import checks, tracing
from takeoff_queue.book import EnqueueRequest, QueueBook
from takeoff_queue.dispatcher import Dispatcher, Session
from takeoff_queue.lifecycle import FailureReason, ItemState, Transition
from takeoff_queue.model import (
    AGENT,
    ITEM,
    ITEM_IN_ANY_QUEUE,
    PROJECT,
    QUEUE,
    Ack,
    Agent,
    AgentRequest,
    Assignment,
    Cancel,
    Complete,
    Drain,
    Heartbeat,
    Hello,
    Item,
    MessageKind,
    Priority,
    Progress,
    Queue,
    Reject,
    RejectReason,
    Release,
    Revoke,
    SecretMount,
    SessionClosed,
    SetCapacity,
    Welcome,
)
from takeoff_queue.pending import Waiting
from takeoff_queue.queue_watch import QueueView
from takeoff_queue.resource_config import ResourceKind
from takeoff_server.access import KeyKind, caller_var, current_actor
from takeoff_server.errors import Aborted, FieldViolation, InvalidArgument, NotFound, Unavailable
from takeoff_server.names import ResourcePattern
from takeoff_server.pagination import MAX_PAGE_BYTES, page_request, page_response
from takeoff_server.protovalues import dict_to_struct, optional_duration, optional_timestamp, struct_to_dict
from takeoff_server.rate_limits import Rate, RateLimiter
from takeoff_server.validation import Problems, duration_value, enum_member, field_error

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_ENQUEUE_RATE = Rate(per_second=50, burst=200)

_RESOURCE_KIND_PROTOS: dict[ResourceKind, common_pb2.ResourceKind.ValueType] = {
    kind: common_pb2.ResourceKind.Value(f"RESOURCE_KIND_{kind.name}") for kind in ResourceKind
}


def _resource_kind(number: int, field: str) -> ResourceKind:
    kind = enum_member(ResourceKind, number, field=field, proto=common_pb2.ResourceKind)
    if kind is None:
        raise field_error(field, "required: local-process, local-container or kubernetes")
    return kind


_STATE_PROTOS: dict[ItemState | None, common_pb2.ItemState.ValueType] = {
    None: common_pb2.ITEM_STATE_UNSPECIFIED,
    **{state: common_pb2.ItemState.Value(f"ITEM_STATE_{state.value}") for state in ItemState},
}
_REASON_PROTOS: dict[FailureReason | None, common_pb2.FailureReason.ValueType] = {
    None: common_pb2.FAILURE_REASON_UNSPECIFIED,
    **{reason: common_pb2.FailureReason.Value(f"FAILURE_REASON_{reason.value}") for reason in FailureReason},
}


def _state_proto(state: ItemState | None) -> common_pb2.ItemState.ValueType:
    return _STATE_PROTOS[state]


def _reason_proto(reason: FailureReason | None) -> common_pb2.FailureReason.ValueType:
    return _REASON_PROTOS[reason]


def _queue_from_proto(message: queue_pb2.Queue) -> Queue:
    return Queue(
        name=message.name,
        resource=_resource_kind(message.resource, "queue.resource"),
        create_time=datetime.min,
        update_time=datetime.min,
        description=message.description,
        resource_config=struct_to_dict(message.resource_config),
        template_variables={
            name: {"schema": struct_to_dict(variable.schema), "description": variable.description}
            for name, variable in message.template_variables.items()
        },
        prioritization=message.prioritization,
        max_attempts=message.max_attempts or 3,
        retry_job_failures=message.retry_job_failures,
        retry_delay=duration_value(message.retry_delay, field="queue.retry_delay"),
        start_timeout=duration_value(message.start_timeout, field="queue.start_timeout")
        if message.HasField("start_timeout")
        else None,
        # unset or 0: unlimited
        max_run_time=duration_value(message.max_run_time, field="queue.max_run_time") or None,
        concurrency_limit=message.concurrency_limit,
        paused=message.paused,
        container_name=message.container_name,
        secure=message.secure,
        allow_host_paths=message.allow_host_paths,
        secrets=_mounts_from_proto(message.secrets),
    )


def _mounts_from_proto(mounts: Iterable[queue_pb2.SecretMount]) -> tuple[SecretMount, ...]:
    """As given: the queue book checks them and resolves short ids in the queue's project."""
    return tuple(SecretMount(mount.secret, mount.env, mount.file) for mount in mounts)


def _mounts_to_proto(mounts: Iterable[SecretMount]) -> list[queue_pb2.SecretMount]:
    return [queue_pb2.SecretMount(secret=mount.secret, env=mount.env, file=mount.file) for mount in mounts]


def _queue_to_proto(
    queue: Queue, counts: dict[ItemState, int] | None = None, agents: int = 0
) -> queue_pb2.Queue:
    counts = counts or {}
    return queue_pb2.Queue(
        name=queue.name,
        description=queue.description,
        resource=_RESOURCE_KIND_PROTOS[queue.resource],
        resource_config=dict_to_struct(queue.resource_config),
        template_variables={
            name: queue_pb2.TemplateVariable(
                schema=dict_to_struct(variable["schema"]), description=variable.get("description", "")
            )
            for name, variable in queue.template_variables.items()
        },
        prioritization=queue.prioritization,
        max_attempts=queue.max_attempts,
        retry_job_failures=queue.retry_job_failures,
        retry_delay=optional_duration(queue.retry_delay),
        start_timeout=optional_duration(queue.start_timeout),
        max_run_time=optional_duration(queue.max_run_time),
        concurrency_limit=queue.concurrency_limit,
        paused=queue.paused,
        container_name=queue.container_name,
        secure=queue.secure,
        allow_host_paths=queue.allow_host_paths,
        secrets=_mounts_to_proto(queue.secrets),
        create_time=optional_timestamp(queue.create_time),
        update_time=optional_timestamp(queue.update_time),
        item_counts=queue_pb2.ItemCounts(**{state.value.lower(): count for state, count in counts.items()}),
        agent_count=agents,
    )


def _transition_to_proto(transition: Transition) -> queue_pb2.ItemTransition:
    return queue_pb2.ItemTransition(
        time=optional_timestamp(transition.time),
        from_state=_state_proto(transition.from_state),
        to_state=_state_proto(transition.to_state),
        reason=_reason_proto(transition.reason),
        message=transition.message,
        agent=transition.agent,
        attempt=transition.attempt,
        epoch=transition.epoch,
        run=transition.run,
        actor=transition.actor,
    )


def _item_to_proto(
    item: Item,
    lease_expire_time: datetime | None = None,
    waiting: Waiting | None = None,
    *,
    with_history: bool = True,
) -> queue_pb2.Item:
    life = item.life
    leased = life.state.is_live
    return queue_pb2.Item(
        name=item.name,
        job=item.job,
        job_version=item.job_version,
        run_config=dict_to_struct(item.run_config),
        entrypoint=item.entrypoint,
        resource_config_override=dict_to_struct(item.resource_config_override),
        template_variables=dict_to_struct(item.template_variables),
        resource_config=dict_to_struct(item.resource_config),
        priority=int(item.priority),  # type: ignore[arg-type]
        state=_state_proto(life.state),
        attempt=life.attempt,
        max_attempts=life.max_attempts,
        max_run_time=optional_duration(item.max_run_time),
        run_display_name=item.run_display_name,
        epoch=life.epoch,
        cancel_requested=life.cancel_requested,
        enqueue_time=optional_timestamp(life.enqueue_time),
        eligible_time=optional_timestamp(life.eligible_time),
        update_time=optional_timestamp(item.update_time),
        end_time=optional_timestamp(item.end_time),
        lease_id=item.lease_id if leased else "",
        agent=life.agent,
        lease_expire_time=optional_timestamp(lease_expire_time) if leased else None,
        start_deadline=optional_timestamp(item.start_deadline) if leased else None,
        run=life.run,
        reason=_reason_proto(life.reason),
        message=life.message,
        exit_code=life.exit_code,
        transitions=[_transition_to_proto(t) for t in life.history] if with_history else [],
        traceparent=item.traceparent,
        relaunched_from=item.relaunched_from,
        secrets=_mounts_to_proto(item.secrets),
        creator=item.creator,
        position=waiting.position if waiting else 0,
        pending_reason=queue_pb2.PendingReason.Value(f"PENDING_REASON_{waiting.reason.value}")
        if waiting
        else queue_pb2.PENDING_REASON_UNSPECIFIED,
        pending_detail=waiting.detail if waiting else "",
    )


def _agent_to_proto(agent: Agent, items: dict[str, Item]) -> queue_pb2.Agent:
    leases = []
    for lease_id, item_id in agent.leases.items():
        item = items.get(item_id)
        if item is not None:
            leases.append(
                queue_pb2.AgentLease(
                    lease_id=lease_id,
                    item=item.name,
                    epoch=item.life.epoch,
                    attempt=item.life.attempt,
                    state=_state_proto(item.state),
                    assign_time=optional_timestamp(item.assign_time),
                    run=item.life.run,
                )
            )
    return queue_pb2.Agent(
        name=agent.name,
        display_name=agent.display_name,
        session_id=agent.session_id,
        connected=agent.connected,
        queues=agent.queues,
        resources=[_RESOURCE_KIND_PROTOS[kind] for kind in sorted(agent.resources, key=lambda k: k.value)],
        capacity=agent.capacity,
        draining=agent.draining,
        leases=leases,
        version=agent.version,
        labels=agent.labels,
        connect_time=optional_timestamp(agent.connect_time),
        last_heartbeat_time=optional_timestamp(agent.last_heartbeat_time),
        disconnect_time=optional_timestamp(agent.disconnect_time),
    )


def _hello_from_proto(hello: queue_pb2.LeaseRequest.Hello) -> Hello:
    """A Hello within every bound queue.proto documents, so the Agent it makes fits ListAgents; any
    problem ends the stream (ARGUMENT_INVALID naming each field)."""
    AGENT.parse(f"agents/{hello.agent_id}", field="hello.agent_id")
    problems = Problems()
    if not hello.session_id:
        problems.add("ARGUMENT_INVALID", "hello.session_id", "required: a new id for every connection")
    checks.check_text(
        hello.session_id, field="hello.session_id", max_chars=checks.MAX_SESSION_ID_CHARS, problems=problems
    )
    checks.check_text(
        hello.display_name,
        field="hello.display_name",
        max_chars=checks.MAX_AGENT_DISPLAY_NAME_CHARS,
        problems=problems,
    )
    checks.check_text(
        hello.version, field="hello.version", max_chars=checks.MAX_AGENT_VERSION_CHARS, problems=problems
    )
    checks.check_labels(hello.labels, field="hello.labels", problems=problems)
    checks.check_capacity(hello.capacity, field="hello.capacity", problems=problems)
    if not hello.resources:
        problems.add("ARGUMENT_INVALID", "hello.resources", "required: the resource kinds the agent can run")
    checks.check_count(
        hello.resources, field="hello.resources", at_most=checks.MAX_AGENT_RESOURCES, problems=problems
    )
    if checks.check_count(
        hello.queues, field="hello.queues", at_most=checks.MAX_AGENT_QUEUES, problems=problems
    ):
        for index, queue in enumerate(hello.queues):
            if QUEUE.match(queue) is None:
                problems.add(
                    "ARGUMENT_INVALID", f"hello.queues[{index}]", f"{queue[:200]!r} is not a queue name"
                )
    if checks.check_count(
        hello.held_leases, field="hello.held_leases", at_most=checks.MAX_AGENT_CAPACITY, problems=problems
    ):
        for index, held in enumerate(hello.held_leases):
            checks.check_text(
                held.lease_id,
                field=f"hello.held_leases[{index}].lease_id",
                max_chars=checks.MAX_LEASE_ID_CHARS,
                problems=problems,
            )
            checks.check_text(
                held.item,
                field=f"hello.held_leases[{index}].item",
                max_chars=checks.MAX_HELD_ITEM_CHARS,
                problems=problems,
            )
    problems.raise_if_any()
    return Hello(
        agent_id=hello.agent_id,
        session_id=hello.session_id,
        display_name=hello.display_name,
        queues=list(hello.queues),
        resources={_resource_kind(kind, "hello.resources") for kind in hello.resources},
        capacity=hello.capacity,
        held_leases={held.lease_id: held.epoch for held in hello.held_leases},
        version=hello.version,
        labels=dict(hello.labels),
        draining=hello.draining,
    )


_LEASE_MESSAGE_KINDS = {
    "heartbeat": MessageKind.HEARTBEAT,
    "progress": MessageKind.PROGRESS,
    "complete": MessageKind.COMPLETE,
    "release": MessageKind.RELEASE,
    "set_capacity": MessageKind.SET_CAPACITY,
    "drain": MessageKind.DRAIN,
}


def _agent_request_from_proto(request: queue_pb2.LeaseRequest) -> AgentRequest | Reject:
    """The agent's message as a domain value, or the Reject (INVALID_MESSAGE) answering a malformed one:
    a malformed message changes nothing and keeps the stream. Only a second Hello ends it (queue.proto)."""
    which = request.WhichOneof("message")
    if which == "hello":
        raise InvalidArgument(
            "HELLO_REQUIRED",
            "Hello comes once, first; after it only lease messages",
            violations=[FieldViolation("hello", "only the first message of a stream is a Hello")],
        )
    try:
        return _agent_request(request)
    except InvalidArgument as malformed:
        kind = _LEASE_MESSAGE_KINDS.get(which or "")
        lease_id = getattr(getattr(request, which), "lease_id", "") if which else ""
        if len(lease_id) > checks.MAX_LEASE_ID_CHARS:
            lease_id = ""  # not a lease id the server gave out, and not worth echoing
        return Reject(request.sequence, kind, lease_id, RejectReason.INVALID_MESSAGE, malformed.message)


def _agent_request(request: queue_pb2.LeaseRequest) -> AgentRequest:
    sequence = request.sequence
    match request.WhichOneof("message"):
        case "heartbeat":
            return Heartbeat(sequence)
        case "progress":
            progress = request.progress
            _require_lease(progress.lease_id, progress.epoch, "progress")
            state = _required(
                enum_member(ItemState, progress.state, field="progress.state", proto=common_pb2.ItemState),
                "progress.state",
            )
            detail = checks.agent_report(progress.detail, max_bytes=checks.MAX_PROGRESS_DETAIL_BYTES)
            return Progress(sequence, progress.lease_id, progress.epoch, state, detail)
        case "complete":
            complete = request.complete
            _require_lease(complete.lease_id, complete.epoch, "complete")
            outcome = _required(
                enum_member(
                    ItemState, complete.outcome, field="complete.outcome", proto=common_pb2.ItemState
                ),
                "complete.outcome",
            )
            reason = enum_member(
                FailureReason, complete.reason, field="complete.reason", proto=common_pb2.FailureReason
            )
            exit_code = complete.exit_code if complete.HasField("exit_code") else None
            message = checks.agent_report(complete.message, max_bytes=checks.MAX_OUTCOME_MESSAGE_BYTES)
            return Complete(sequence, complete.lease_id, complete.epoch, outcome, reason, exit_code, message)
        case "release":
            release = request.release
            _require_lease(release.lease_id, release.epoch, "release")
            message = checks.agent_report(release.message, max_bytes=checks.MAX_OUTCOME_MESSAGE_BYTES)
            return Release(sequence, release.lease_id, release.epoch, message)
        case "set_capacity":
            problems = Problems()
            checks.check_capacity(
                request.set_capacity.capacity, field="set_capacity.capacity", problems=problems
            )
            problems.raise_if_any()
            return SetCapacity(sequence, request.set_capacity.capacity)
        case "drain":
            return Drain(sequence)
    raise field_error("message", "required: heartbeat, progress, complete, release, set_capacity or drain")


def _require_lease(lease_id: str, epoch: int, message: str) -> None:
    if not lease_id:
        raise field_error(f"{message}.lease_id", "required: the lease id of the Assignment")
    if len(lease_id) > checks.MAX_LEASE_ID_CHARS:
        raise field_error(f"{message}.lease_id", f"at most {checks.MAX_LEASE_ID_CHARS} characters")
    if epoch < 1:
        raise field_error(f"{message}.epoch", "required: the epoch of the Assignment")


def _required(state: ItemState | None, field: str) -> ItemState:
    if state is None:
        raise field_error(field, "required")
    return state


_KIND_PROTOS = {
    kind: queue_pb2.LeaseMessageKind.Value(f"LEASE_MESSAGE_KIND_{kind.value}") for kind in MessageKind
}


def _response_to_proto(message: Any) -> queue_pb2.LeaseResponse:
    Response = queue_pb2.LeaseResponse
    match message:
        case Welcome():
            return Response(
                welcome=Response.Welcome(
                    agent=message.agent,
                    session_id=message.session_id,
                    lease_ttl=optional_duration(message.lease_ttl),
                    heartbeat_interval=optional_duration(message.heartbeat_interval),
                    lease_verdicts=[
                        Response.LeaseVerdict(
                            lease_id=v.lease_id,
                            item=v.item,
                            kept=v.kept,
                            reason=queue_pb2.RevokeReason.Value(
                                f"REVOKE_REASON_{v.reason.value if v.reason else 'UNSPECIFIED'}"
                            ),
                            message=v.message,
                        )
                        for v in message.verdicts
                    ],
                    server_time=optional_timestamp(message.server_time),
                )
            )
        case Assignment():
            item, queue = message.item, message.queue
            version = common_pb2.JobVersion.FromString(item.job_version_proto)
            return Response(
                assignment=Response.Assignment(
                    lease_id=message.lease_id,
                    epoch=message.epoch,
                    item=_item_to_proto(item),
                    job_version=version,
                    resource_config=dict_to_struct(item.resource_config),
                    run=message.run,
                    attempt=message.attempt,
                    assign_time=optional_timestamp(message.assign_time),
                    start_deadline=optional_timestamp(message.start_deadline),
                    max_run_time=optional_duration(item.max_run_time),
                    entrypoint=item.entrypoint or list(version.entrypoint),
                    traceparent=tracing.attempt_traceparent(item, message.attempt),
                    queue=queue.name,
                    resource=_RESOURCE_KIND_PROTOS[queue.resource],
                    container_name=queue.container_name,
                    run_token=message.run_token,
                    secrets=_mounts_to_proto(message.secrets),
                )
            )
        case Ack():
            return Response(
                ack=Response.Ack(
                    request_sequence=message.sequence,
                    of=_KIND_PROTOS[message.of],
                    lease_id=message.lease_id,
                    state=_state_proto(message.state),
                )
            )
        case Reject():
            return Response(
                reject=Response.Reject(
                    request_sequence=message.sequence,
                    of=_KIND_PROTOS[message.of] if message.of else queue_pb2.LEASE_MESSAGE_KIND_UNSPECIFIED,
                    lease_id=message.lease_id,
                    reason=queue_pb2.RejectReason.Value(f"REJECT_REASON_{message.reason.value}"),
                    message=message.message,
                )
            )
        case Cancel():
            return Response(
                cancel=Response.Cancel(lease_id=message.lease_id, item=message.item, message=message.message)
            )
        case Revoke():
            return Response(
                revoke=Response.Revoke(
                    lease_id=message.lease_id,
                    item=message.item,
                    reason=queue_pb2.RevokeReason.Value(f"REVOKE_REASON_{message.reason.value}"),
                    message=message.message,
                )
            )
    raise TypeError(f"no LeaseResponse for {message!r}")


class _StreamEnded:
    """Put in a session's outbox when the agent's side of the stream ends."""


@dataclass(frozen=True, slots=True)
class _HandlingFailed:
    """Put in a session's outbox when applying one of the agent's messages failed: the stream ends with
    its error, as it would had the reader raised it."""

    error: BaseException


class QueueApi(queue_pb2_grpc.QueueServiceServicer):
    def __init__(
        self, book: QueueBook, dispatcher: Dispatcher, enqueues: Rate = DEFAULT_ENQUEUE_RATE
    ) -> None:
        self._book = book
        self._dispatcher = dispatcher
        self._enqueues = RateLimiter(enqueues, "enqueues")
        """Per calling key, per process (docs/design.md §13)."""

    async def _item_protos(self, items: Sequence[Item], *, committed: bool = False) -> list[queue_pb2.Item]:
        """The items as the API shows them: a leased one with its lease's expiry, a PENDING one with its
        place in its queue and why it waits. ``committed``: the answer of a write that committed, which a
        failed read of places must not fail (Dispatcher.waiting_now)."""
        waits = await self._dispatcher.waiting_now(items, committed=committed)
        return [_item_to_proto(item, self._lease_expiry(item), waits.get(item.id)) for item in items]

    def _lease_expiry(self, item: Item) -> datetime | None:
        holder = self._dispatcher.agents.get(item.life.agent.removeprefix("agents/"))
        return holder.lease_expiry if holder is not None else None

    def _watch_message(self, view: QueueView) -> tuple[queue_pb2.WatchQueueResponse, list[queue_pb2.Item]]:
        """A WatchQueue message with the view's agents, and its items to send in it and after it."""
        message = queue_pb2.WatchQueueResponse(
            agents=[_agent_to_proto(agent, self._dispatcher.items) for agent in view.agents],
            removed_agents=view.removed_agents,
        )
        items = [
            _item_to_proto(item, self._lease_expiry(item), waiting, with_history=False)
            for item, waiting in view.items
        ]
        return message, items

    async def _item_proto(self, item: Item, *, committed: bool = False) -> queue_pb2.Item:
        return (await self._item_protos([item], committed=committed))[0]

    async def _queue_proto(self, queue: Queue) -> queue_pb2.Queue:
        counts = await self._book.item_counts(queue.name)
        return _queue_to_proto(queue, counts, self._book.agent_count(queue.name))

    async def _check_project(self, name: str, pattern: ResourcePattern, field: str) -> None:
        project = PROJECT.format(project=pattern.parse(name, field=field)["project"])
        await self._book.check_project(project, field=field)

    async def CreateQueue(
        self, request: queue_pb2.CreateQueueRequest, context: Context
    ) -> queue_pb2.CreateQueueResponse:
        queue = await self._book.create_queue(
            request.parent,
            request.queue_id,
            _queue_from_proto(request.queue),
            request.request_id,
        )
        return queue_pb2.CreateQueueResponse(queue=await self._queue_proto(queue))

    async def GetQueue(
        self, request: queue_pb2.GetQueueRequest, context: Context
    ) -> queue_pb2.GetQueueResponse:
        await self._check_project(request.name, QUEUE, "name")
        queue = await self._book.current_queue(request.name)
        return queue_pb2.GetQueueResponse(queue=await self._queue_proto(queue))

    async def ListQueues(
        self, request: queue_pb2.ListQueuesRequest, context: Context
    ) -> queue_pb2.ListQueuesResponse:
        query = {"parent": request.parent, "resource": request.resource}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str],
        )
        kind = _resource_kind(request.resource, "resource") if request.resource else None
        await self._check_project(request.parent, PROJECT, "parent")
        queues, last = self._book.list_queues(request.parent, page, kind)
        shown, token = page_response(
            [(await self._queue_proto(queue), (queue.name,)) for queue in queues],
            more=last is not None,
            query=query,
        )
        return queue_pb2.ListQueuesResponse(queues=shown, next_page_token=token)

    async def UpdateQueue(
        self, request: queue_pb2.UpdateQueueRequest, context: Context
    ) -> queue_pb2.UpdateQueueResponse:
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument(
                "UPDATE_MASK_INVALID",
                "update_mask is required",
                violations=[FieldViolation("update_mask", "required")],
            )
        if paths == ["*"]:
            paths = sorted(_UPDATABLE_QUEUE_FIELDS)
        bad = [path for path in paths if path not in _UPDATABLE_QUEUE_FIELDS]
        if bad:
            raise InvalidArgument(
                "UPDATE_MASK_INVALID",
                f"cannot update {', '.join(bad)}",
                violations=[
                    FieldViolation("update_mask", f"{path} is not an updatable field") for path in bad
                ],
            )
        await self._check_project(request.queue.name, QUEUE, "queue.name")
        current = await self._book.current_queue(request.queue.name, field_name="queue.name")
        # Only the masked fields are read from the request: whatever else it carries is ignored.
        updated = _queue_to_proto(current)
        FieldMask(paths=paths).MergeMessage(
            request.queue, updated, replace_message_field=True, replace_repeated_field=True
        )
        source = _queue_from_proto(updated)
        queue = await self._book.update_queue(current.name, {path: getattr(source, path) for path in paths})
        return queue_pb2.UpdateQueueResponse(queue=await self._queue_proto(queue))

    async def DeleteQueue(
        self, request: queue_pb2.DeleteQueueRequest, context: Context
    ) -> queue_pb2.DeleteQueueResponse:
        await self._check_project(request.name, QUEUE, "name")
        await self._book.delete_queue(request.name, force=request.force)
        return queue_pb2.DeleteQueueResponse()

    async def Enqueue(self, request: queue_pb2.EnqueueRequest, context: Context) -> queue_pb2.EnqueueResponse:
        caller = caller_var.get()
        self._enqueues.take(caller.name if caller is not None else "")  # before anything is read or stored
        priority = enum_member(Priority, request.priority, field="priority", proto=common_pb2.Priority)
        item = await self._book.enqueue(
            EnqueueRequest(
                queue=request.queue,
                job=request.job,
                run_config=struct_to_dict(request.run_config),
                entrypoint=list(request.entrypoint),
                resource_config=struct_to_dict(request.resource_config),
                template_variables=struct_to_dict(request.template_variables),
                priority=priority or Priority.MEDIUM,
                max_attempts=request.max_attempts,
                max_run_time=duration_value(request.max_run_time, field="max_run_time")
                if request.HasField("max_run_time")
                else None,
                run_display_name=request.run_display_name,
                request_id=request.request_id,
                traceparent=_traceparent(),
                secrets=_mounts_from_proto(request.secrets),
                creator=current_actor(),
            )
        )
        if item.state is ItemState.LEASED:
            # One turn of the loop first: the Lease stream, woken by the Assignment, hands it to gRPC before
            # this builds its answer. The agent's start is what a launch waits for (bench/dispatch.py:
            # Enqueue to Assignment about 0.2 ms sooner).
            await asyncio.sleep(0)
        return queue_pb2.EnqueueResponse(item=await self._item_proto(item, committed=True))

    async def GetItem(self, request: queue_pb2.GetItemRequest, context: Context) -> queue_pb2.GetItemResponse:
        pattern = ITEM_IN_ANY_QUEUE if ITEM_IN_ANY_QUEUE.match(request.name) else ITEM
        await self._check_project(request.name, pattern, "name")
        item = await self._book.find_item(request.name)
        return queue_pb2.GetItemResponse(item=await self._item_proto(item))

    async def ListItems(
        self, request: queue_pb2.ListItemsRequest, context: Context
    ) -> queue_pb2.ListItemsResponse:
        states = [
            enum_member(ItemState, number, field=f"states[{index}]", proto=common_pb2.ItemState)
            for index, number in enumerate(request.states)
        ]
        query = {
            "parent": request.parent,
            "states": [state.value if state else "" for state in states],
            "job": request.job,
            "id_prefix": request.id_prefix,
        }
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[int],
        )
        checks.check_job_filter(request.job)
        checks.check_id_prefix(request.id_prefix)
        if request.parent.endswith("/queues/-"):
            await self._check_project(request.parent.removesuffix("/queues/-"), PROJECT, "parent")
        else:
            await self._check_project(request.parent, QUEUE, "parent")
        wanted = [state for state in states if state is not None]
        if states and not wanted:
            return queue_pb2.ListItemsResponse()  # ITEM_STATE_UNSPECIFIED matches nothing
        items, last = await self._book.list_items(
            request.parent, wanted, page, request.job, request.id_prefix
        )
        protos = await self._item_protos(items)
        shown, token = page_response(
            [(proto, (item.seq,)) for proto, item in zip(protos, items, strict=True)],
            more=last is not None,
            query=query,
        )
        return queue_pb2.ListItemsResponse(items=shown, next_page_token=token)

    async def CancelItem(
        self, request: queue_pb2.CancelItemRequest, context: Context
    ) -> queue_pb2.CancelItemResponse:
        problems = Problems()
        checks.check_text(
            request.message, field="message", max_chars=checks.MAX_CANCEL_MESSAGE_CHARS, problems=problems
        )
        problems.raise_if_any()
        item = await self._book.cancel_item(
            request.name, request.message or "cancelled by user", actor=current_actor()
        )
        return queue_pb2.CancelItemResponse(item=await self._item_proto(item, committed=True))

    async def RelaunchItem(
        self, request: queue_pb2.RelaunchItemRequest, context: Context
    ) -> queue_pb2.RelaunchItemResponse:
        item = await self._book.relaunch_item(request.name, request.request_id, actor=current_actor())
        return queue_pb2.RelaunchItemResponse(item=await self._item_proto(item, committed=True))

    async def WatchQueue(
        self, request: queue_pb2.WatchQueueRequest, context: Context
    ) -> AsyncIterator[queue_pb2.WatchQueueResponse]:
        with self._book.watch_queue(request.name) as watcher:
            message, items = self._watch_message(await watcher.snapshot())
            message.snapshot = True
            while True:  # the snapshot's items over as many messages as their size needs
                count = _fitting(items, MAX_PAGE_BYTES - message.ByteSize())
                message.items.extend(items[:count])
                items = items[count:]
                message.snapshot_done = not items
                yield message
                if not items:
                    break
                message = queue_pb2.WatchQueueResponse(snapshot=True)
            async for view in watcher.changes():
                message, items = self._watch_message(view)
                count = _fitting(items, MAX_PAGE_BYTES - message.ByteSize())
                message.items.extend(items[:count])
                watcher.send_later(item for item, _ in view.items[count:])
                yield message

    async def WatchItem(
        self, request: queue_pb2.WatchItemRequest, context: Context
    ) -> AsyncIterator[queue_pb2.WatchItemResponse]:
        seen: int | None = None
        told = (queue_pb2.PENDING_REASON_UNSPECIFIED, "")
        async for item in self._book.watch_item(request.name):
            shown = await self._item_proto(item)
            if seen is None:
                yield queue_pb2.WatchItemResponse(item=shown)  # the item as it is: no transition yet
            elif item.history[seen:]:
                for transition in item.history[seen:]:
                    yield queue_pb2.WatchItemResponse(item=shown, transition=_transition_to_proto(transition))
            elif (shown.pending_reason, shown.message) != told:
                # still PENDING, for another reason; or a new detail of its state (a repeated Progress)
                yield queue_pb2.WatchItemResponse(item=shown)
            seen, told = len(item.history), (shown.pending_reason, shown.message)

    async def ListAgents(
        self, request: queue_pb2.ListAgentsRequest, context: Context
    ) -> queue_pb2.ListAgentsResponse:
        query = {"queue": request.queue, "include_disconnected": request.include_disconnected}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str],
        )
        if request.queue:
            QUEUE.parse(request.queue, field="queue")
        after = str(page.after[0]) if page.after else ""
        agents = sorted(
            (
                agent
                for agent in self._dispatcher.agents.values()
                if (agent.connected or (request.include_disconnected and agent.leases))
                and (not request.queue or request.queue in agent.queues)
                and agent.agent_id > after
            ),
            key=lambda agent: agent.agent_id,
        )
        shown, token = page_response(
            [
                (_agent_to_proto(agent, self._dispatcher.items), (agent.agent_id,))
                for agent in agents[: page.size]
            ],
            more=len(agents) > page.size,
            query=query,
        )
        return queue_pb2.ListAgentsResponse(agents=shown, next_page_token=token)

    async def GetAgent(
        self, request: queue_pb2.GetAgentRequest, context: Context
    ) -> queue_pb2.GetAgentResponse:
        agent_id = AGENT.parse(request.name, field="name")["agent"]
        agent = self._dispatcher.agents.get(agent_id)
        if agent is None:
            raise NotFound(
                "AGENT_NOT_FOUND", f"agent {request.name} is not known", metadata={"resource": request.name}
            )
        return queue_pb2.GetAgentResponse(agent=_agent_to_proto(agent, self._dispatcher.items))

    async def Lease(
        self, request_iterator: AsyncIterator[queue_pb2.LeaseRequest], context: Context
    ) -> AsyncIterator[queue_pb2.LeaseResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                "HELLO_REQUIRED",
                "the first message of a Lease stream must be a Hello",
                violations=[FieldViolation("hello", "required as the first message")],
            )
        caller = caller_var.get()
        session = await self._dispatcher.connect(
            _hello_from_proto(first.hello),
            key=caller.name if caller is not None else "",
            any_agent=caller is None or caller.kind is KeyKind.ADMIN,
        )
        reader = asyncio.create_task(self._read(session, requests))
        reader.add_done_callback(lambda _: session.outbox.put_nowait(_StreamEnded()))
        try:
            while True:
                message = await session.outbox.get()
                if isinstance(message, _HandlingFailed):
                    raise message.error
                if isinstance(message, _StreamEnded):
                    if not reader.cancelled() and (error := reader.exception()) is not None:
                        raise error
                    return
                if isinstance(message, SessionClosed):
                    if message.superseded:
                        raise Aborted(
                            "SESSION_SUPERSEDED",
                            "a newer session of this agent connected; this one is closed",
                        )
                    raise Unavailable(
                        "SHUTTING_DOWN", "the queue service is stopping; reconnect with held_leases"
                    )
                yield _response_to_proto(message)
        finally:
            reader.cancel()
            self._dispatcher.disconnect(session)

    async def _read(self, session: Session, requests: AsyncIterator[queue_pb2.LeaseRequest]) -> None:
        """Apply each message as it arrives, without waiting for the commit of the one before: a Heartbeat
        behind a burst of Progress and Complete messages renews the leases at once instead of after all
        their commits (which, on a slow disk, could outlast the lease TTL), and one agent's changes share
        group commits. Order is kept: each message changes the index before its first wait, in arrival
        order, its write joins the group commit in that order, and the Acks follow the commits."""
        handling: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            handling.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                session.outbox.put_nowait(_HandlingFailed(error))

        async for request in requests:
            message = _agent_request_from_proto(request)
            if isinstance(message, Reject):
                session.send(message)
                continue
            task = asyncio.create_task(self._dispatcher.handle(session, message))
            handling.add(task)
            task.add_done_callback(done)


_UPDATABLE_QUEUE_FIELDS = frozenset(
    {
        "description",
        "resource_config",
        "template_variables",
        "prioritization",
        "max_attempts",
        "retry_job_failures",
        "retry_delay",
        "start_timeout",
        "max_run_time",
        "concurrency_limit",
        "paused",
        "container_name",
        "secure",
        "allow_host_paths",
        "secrets",
    }
)


def _fitting(items: Sequence[queue_pb2.Item], room: int) -> int:
    """How many of the items, from the first, fit in ``room`` bytes of a message (one always does: the
    per-field limits bound each item, and a message's room leaves gRPC's 4 MiB a margin)."""
    size = 0
    for count, item in enumerate(items):
        size += item.ByteSize()
        if count and size > room:
            return count
    return len(items)


def _traceparent() -> str:
    """The current trace context (the Enqueue call's span) as a W3C traceparent, or empty."""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")
