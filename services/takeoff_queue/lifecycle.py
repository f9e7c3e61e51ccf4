"""The item life cycle of docs/design.md §5, as plain data and pure functions.

Every change to an item goes through one function here and comes back as a :class:`Transition` to
record; the functions refuse what the state table forbids. The store persists the result and the
dispatcher decides *when* to call them; neither decides *what* a state change means.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from takeoff_server.errors import FailedPrecondition


class ItemState(enum.Enum):
    PENDING = "PENDING"
    LEASED = "LEASED"
    BUILDING = "BUILDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    # By identity, in C: Enum's own hash is a Python call (of the name's), and an item's life cycle hashes
    # its states a few dozen times (these sets, the protos' tables). Members are singletons, equal only to
    # themselves, so the hash agrees with equality as before.
    __hash__ = object.__hash__

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_live(self) -> bool:
        """Held under a lease: counts against capacity and the queue's concurrency limit."""
        return self in LIVE_STATES


TERMINAL_STATES = frozenset({ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED})
_REASONED_STATES = frozenset({ItemState.PENDING, *TERMINAL_STATES})
"""A transition to these keeps the item's reason (why it waits again, why it ended)."""
LIVE_STATES = frozenset({ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING})
_PROGRESS_ORDER = (ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING)


class FailureReason(enum.Enum):
    AGENT_LOST = "AGENT_LOST"
    BUILD_INFRA = "BUILD_INFRA"
    PREEMPTED = "PREEMPTED"
    START_TIMEOUT = "START_TIMEOUT"
    RUNNER_INFRA = "RUNNER_INFRA"
    RELEASED = "RELEASED"
    MAX_RUN_TIME_EXCEEDED = "MAX_RUN_TIME_EXCEEDED"
    JOB_FAILED = "JOB_FAILED"
    NO_RUN = "NO_RUN"
    BUILD_FAILED = "BUILD_FAILED"
    CONFIG_INVALID = "CONFIG_INVALID"
    CANCELLED = "CANCELLED"

    @property
    def is_infrastructure(self) -> bool:
        """Not the job's fault: always worth another attempt."""
        return self in _INFRASTRUCTURE_FAILURES

    @property
    def backs_off(self) -> bool:
        """A fault outside the job that the next attempt may meet again unless it waits: the item waits
        :func:`infrastructure_backoff` on top of ``retry_delay``. RELEASED does not: a hand-back (a
        draining agent) is no fault, and another agent should have the item at once."""
        return self.is_infrastructure and self is not FailureReason.RELEASED


_INFRASTRUCTURE_FAILURES = frozenset(
    {
        FailureReason.AGENT_LOST,
        FailureReason.BUILD_INFRA,
        FailureReason.PREEMPTED,
        FailureReason.START_TIMEOUT,
        FailureReason.RUNNER_INFRA,
        FailureReason.RELEASED,
    }
)


BACKOFF_FIRST = timedelta(seconds=1)
BACKOFF_CAP = timedelta(seconds=60)


def infrastructure_backoff(failed_attempts: int) -> timedelta:
    """``min(60 s, 1 s * 2^(failed_attempts - 1))`` (docs/design.md §16), without jitter: only leased
    items call the failing dependency, so agent capacity bounds the load a whole queue's retries put on
    it, and the agents' own calls are jittered; a fixed time is what ``Item.eligible_time`` shows."""
    doublings = min(max(0, failed_attempts - 1), 6)  # 2^6 s is past the cap already
    return min(BACKOFF_CAP, BACKOFF_FIRST * (1 << doublings))


NEVER = datetime.max.replace(tzinfo=UTC)
"""A deadline beyond every date: it never comes."""


def later(when: datetime, delay: timedelta) -> datetime:
    """``when + delay``, or :data:`NEVER` when that lies beyond the last date a datetime holds."""
    try:
        return when + delay
    except OverflowError:
        return NEVER


class LeaseLost(FailedPrecondition):
    """A message about an item carried an epoch that no longer owns it: the sender is a zombie."""

    def __init__(self, item_id: str, epoch: int, current_epoch: int) -> None:
        super().__init__(
            "LEASE_LOST",
            f"item {item_id} is at epoch {current_epoch}; epoch {epoch} no longer holds it",
            metadata={"item": item_id, "epoch": str(epoch), "current_epoch": str(current_epoch)},
        )


class IllegalTransition(FailedPrecondition):
    def __init__(self, item_id: str, state: ItemState, wanted: str) -> None:
        super().__init__(
            "INVALID_TRANSITION",
            f"item {item_id} is {state.value}; cannot {wanted}",
            metadata={"item": item_id, "state": state.value},
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The queue settings that decide whether a failed attempt is tried again."""

    retry_job_failures: bool = False
    retry_delay: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded change of state (the item's history is a list of these)."""

    time: datetime
    from_state: ItemState | None
    to_state: ItemState
    attempt: int
    epoch: int
    reason: FailureReason | None = None
    message: str = ""
    agent: str = ""
    run: str = ""
    actor: str = ""
    """Who caused it when a caller did (Enqueue, CancelItem, RelaunchItem): ``keys/{key} (name)``."""


@dataclass(frozen=True, slots=True)
class ItemLife:
    """The part of an item the life cycle reads and writes: its state, its current (or last) lease, and
    its whole history. Nothing else changes these: the dispatcher replaces the whole value."""

    item_id: str
    state: ItemState
    max_attempts: int
    enqueue_time: datetime
    eligible_time: datetime
    attempt: int = 0
    epoch: int = 0
    cancel_requested: bool = False
    agent: str = ""
    run: str = ""
    reason: FailureReason | None = None
    message: str = ""
    exit_code: int | None = None
    lease_id: str = ""
    """The current lease, or the last one once it ended (the Ack of a resent Complete names it)."""
    assign_time: datetime | None = None
    start_deadline: datetime | None = None
    running_since: datetime | None = None
    completed_epoch: int = 0
    """The epoch whose agent reported the attempt's end with Complete (0: none did)."""
    end_time: datetime | None = None
    cancelled_by: str = ""
    """Who asked for the cancel: the CANCELLED transition it causes, now or when the attempt ends, names
    them."""
    history: tuple[Transition, ...] = field(default_factory=tuple)
    """Every transition since Enqueue, oldest first."""

    def _moved(self, now: datetime, to_state: ItemState, **changes: Any) -> ItemLife:
        if to_state.is_terminal:
            changes["end_time"] = now

        def after(name: str) -> Any:
            return changes[name] if name in changes else getattr(self, name)

        transition = Transition(
            time=now,
            from_state=self.state,
            to_state=to_state,
            attempt=after("attempt"),
            epoch=after("epoch"),
            reason=after("reason") if to_state in _REASONED_STATES else None,
            message=after("message"),
            agent=after("agent"),
            run=after("run"),
            actor=after("cancelled_by") if to_state is ItemState.CANCELLED else "",
        )
        # One new value, not one per change: the dispatcher moves every item through here several times.
        return replace(self, state=to_state, history=(*self.history, transition), **changes)

    def check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or not self.state.is_live:
            raise LeaseLost(self.item_id, epoch, self.epoch)


def enqueued(item_id: str, max_attempts: int, now: datetime, actor: str = "") -> ItemLife:
    """(new) -> PENDING, by ``actor``."""
    first = Transition(now, None, ItemState.PENDING, attempt=0, epoch=0, actor=actor)
    return ItemLife(
        item_id, ItemState.PENDING, max_attempts, enqueue_time=now, eligible_time=now, history=(first,)
    )


def assign(
    item: ItemLife,
    agent: str,
    now: datetime,
    *,
    lease_id: str = "",
    run: str = "",
    start_timeout: timedelta | None = None,
) -> ItemLife:
    """PENDING -> LEASED: a new attempt under a new epoch and lease, tracked by a new run."""
    if item.state is not ItemState.PENDING or item.cancel_requested:
        raise IllegalTransition(item.item_id, item.state, "assign it")
    return item._moved(
        now,
        ItemState.LEASED,
        attempt=item.attempt + 1,
        epoch=item.epoch + 1,
        agent=agent,
        run=run,
        reason=None,
        message="",
        exit_code=None,
        lease_id=lease_id,
        assign_time=now,
        start_deadline=None if start_timeout is None else later(now, start_timeout),
        running_since=None,
    )


def progress(item: ItemLife, epoch: int, state: ItemState, now: datetime, detail: str = "") -> ItemLife:
    """LEASED -> BUILDING -> STARTING -> RUNNING, forward only. A repeat of the current state records no
    transition; a new detail in it replaces the item's message (a runner saying why the start waits: Slurm's
    pending reason, a pod not scheduled yet), and one without a detail changes nothing."""
    item.check_epoch(epoch)
    if state not in _PROGRESS_ORDER:
        raise IllegalTransition(item.item_id, item.state, f"report progress to {state.value}")
    if state is item.state:
        return item if detail in ("", item.message) else replace(item, message=detail)
    if _PROGRESS_ORDER.index(state) < _PROGRESS_ORDER.index(item.state):
        raise IllegalTransition(item.item_id, item.state, f"move back to {state.value}")
    if state is ItemState.RUNNING:
        return item._moved(now, state, message=detail, running_since=now)
    return item._moved(now, state, message=detail)


def complete(
    item: ItemLife,
    epoch: int,
    outcome: ItemState,
    now: datetime,
    policy: RetryPolicy,
    *,
    reason: FailureReason | None = None,
    message: str = "",
    exit_code: int | None = None,
) -> ItemLife:
    """The agent's verdict on the attempt: SUCCEEDED, CANCELLED, or a failure (which may be retried)."""
    item.check_epoch(epoch)
    if outcome is ItemState.SUCCEEDED:
        return item._moved(
            now,
            ItemState.SUCCEEDED,
            reason=None,
            message=message,
            exit_code=exit_code,
            completed_epoch=epoch,
        )
    if outcome is ItemState.CANCELLED and not item.cancel_requested:
        raise IllegalTransition(item.item_id, item.state, "complete it as CANCELLED: no cancel was requested")
    if outcome not in (ItemState.FAILED, ItemState.CANCELLED):
        raise IllegalTransition(item.item_id, item.state, f"complete it as {outcome.value}")
    failure = reason or FailureReason.JOB_FAILED
    ended = end_attempt(item, failure, now, policy, message=message, exit_code=exit_code)
    return replace(ended, completed_epoch=epoch)


def release(item: ItemLife, epoch: int, now: datetime, policy: RetryPolicy, message: str = "") -> ItemLife:
    """The agent hands back work it has not started; it counts as an attempt."""
    item.check_epoch(epoch)
    if item.state is ItemState.RUNNING:
        raise IllegalTransition(item.item_id, item.state, "release it: it is already running")
    return end_attempt(item, FailureReason.RELEASED, now, policy, message=message)


def end_attempt(
    item: ItemLife,
    reason: FailureReason,
    now: datetime,
    policy: RetryPolicy,
    *,
    message: str = "",
    exit_code: int | None = None,
) -> ItemLife:
    """A live attempt ended without success (lease expired, released, timed out, or failed).

    Back to PENDING, keeping its place, when the reason is retryable, attempts are left and no cancel is
    requested; otherwise the item ends: CANCELLED if a cancel was requested, else FAILED. A retried item
    waits ``retry_delay``, and after an infrastructure fault also :func:`infrastructure_backoff` of the
    attempts failed so far (every attempt before this one failed too, or the item would have ended).
    """
    if not item.state.is_live:
        raise IllegalTransition(item.item_id, item.state, "end its attempt")
    if item.cancel_requested:
        return item._moved(
            now, ItemState.CANCELLED, reason=FailureReason.CANCELLED, message=message, exit_code=exit_code
        )
    retryable = reason.is_infrastructure or (
        policy.retry_job_failures and reason is not FailureReason.CANCELLED
    )
    if retryable and item.attempt < item.max_attempts:
        wait = policy.retry_delay
        if reason.backs_off:
            wait += infrastructure_backoff(item.attempt)
        return item._moved(
            now,
            ItemState.PENDING,
            reason=reason,
            message=message,
            exit_code=exit_code,
            eligible_time=later(now, wait),
        )
    return item._moved(now, ItemState.FAILED, reason=reason, message=message, exit_code=exit_code)


FINISHED_WHILE_AWAY = "completed while its agent was unreachable"


def finished_while_away(item: ItemLife, now: datetime, *, exit_code: int | None = None) -> ItemLife:
    """A live attempt that the queue ended without its agent, whose run the job had finished (the SDK's
    finish): the work is done, so the item SUCCEEDED instead of being tried again (docs/design.md §16)."""
    if not item.state.is_live:
        raise IllegalTransition(item.item_id, item.state, "end it as finished")
    return item._moved(
        now, ItemState.SUCCEEDED, reason=None, message=FINISHED_WHILE_AWAY, exit_code=exit_code
    )


def request_cancel(
    item: ItemLife, now: datetime, message: str = "cancelled by user", actor: str = ""
) -> ItemLife:
    """PENDING -> CANCELLED at once; a live item is flagged, and ends when its agent confirms or its
    lease ends. Cancelling an item that is already cancelled (or flagged) changes nothing. The CANCELLED
    transition names ``actor``.
    """
    if item.state is ItemState.CANCELLED or (item.state.is_live and item.cancel_requested):
        return item
    if item.state.is_terminal:
        raise FailedPrecondition(
            "ITEM_ENDED",
            f"item {item.item_id} already ended {item.state.value}",
            metadata={"item": item.item_id, "state": item.state.value},
        )
    if item.state is ItemState.PENDING:
        return item._moved(
            now,
            ItemState.CANCELLED,
            cancel_requested=True,
            cancelled_by=actor,
            reason=FailureReason.CANCELLED,
            message=message,
        )
    return replace(item, cancel_requested=True, cancelled_by=actor)
