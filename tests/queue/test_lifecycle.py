"""The item life cycle against the state table of docs/design.md §5: example by example, and as a
state machine."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from takeoff_queue import lifecycle
from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, LeaseLost, RetryPolicy
from takeoff_server.errors import FailedPrecondition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NO_RETRY = RetryPolicy()


def leased(max_attempts: int = 3) -> ItemLife:
    return lifecycle.assign(lifecycle.enqueued("i1", max_attempts, T0), "agents/a", T0)


def test_assignment_starts_a_new_attempt_under_a_new_epoch() -> None:
    item = leased()

    assert (item.state, item.attempt, item.epoch, item.agent) == (ItemState.LEASED, 1, 1, "agents/a")
    assert [(t.from_state, t.to_state) for t in item.history] == [
        (None, ItemState.PENDING),
        (ItemState.PENDING, ItemState.LEASED),
    ]


def test_progress_moves_forward_only() -> None:
    item = lifecycle.progress(leased(), 1, ItemState.BUILDING, T0)
    item = lifecycle.progress(item, 1, ItemState.RUNNING, T0)

    assert item.state is ItemState.RUNNING
    assert lifecycle.progress(item, 1, ItemState.RUNNING, T0) is item
    with pytest.raises(FailedPrecondition) as backwards:
        lifecycle.progress(item, 1, ItemState.BUILDING, T0)
    assert backwards.value.reason == "INVALID_TRANSITION"


def test_a_stale_epoch_is_lease_lost() -> None:
    first = leased()
    retried = lifecycle.end_attempt(first, FailureReason.AGENT_LOST, T0, NO_RETRY)
    second = lifecycle.assign(retried, "agents/b", T0)

    with pytest.raises(LeaseLost) as zombie:
        lifecycle.complete(second, 1, ItemState.SUCCEEDED, T0, NO_RETRY)
    assert zombie.value.reason == "LEASE_LOST"
    assert lifecycle.complete(second, 2, ItemState.SUCCEEDED, T0, NO_RETRY).state is (ItemState.SUCCEEDED)


def test_infrastructure_failure_retries_keeping_its_place_after_the_delay_and_back_off() -> None:
    policy = RetryPolicy(retry_delay=timedelta(seconds=5))
    later = T0 + timedelta(minutes=1)

    item = lifecycle.end_attempt(leased(), FailureReason.AGENT_LOST, later, policy)

    assert item.state is ItemState.PENDING
    assert item.enqueue_time == T0
    assert item.eligible_time == later + timedelta(seconds=5 + 1)  # retry_delay + 1 s after one failure
    assert item.history[-1].reason is FailureReason.AGENT_LOST


def test_infrastructure_back_off_doubles_per_failed_attempt_up_to_a_minute() -> None:
    waits = [lifecycle.infrastructure_backoff(failed) for failed in range(1, 10)]

    assert [wait.total_seconds() for wait in waits] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_only_faults_outside_the_job_back_off() -> None:
    policy = RetryPolicy(retry_job_failures=True, retry_delay=timedelta(seconds=5))
    item = lifecycle.assign(
        lifecycle.end_attempt(leased(max_attempts=5), FailureReason.JOB_FAILED, T0, policy), "agents/a", T0
    )  # attempt 2: one failed already
    later = T0 + timedelta(minutes=1)

    def wait_after(reason: FailureReason) -> timedelta:
        return lifecycle.end_attempt(item, reason, later, policy).eligible_time - later

    for reason in (FailureReason.JOB_FAILED, FailureReason.NO_RUN, FailureReason.RELEASED):
        assert wait_after(reason) == timedelta(seconds=5), reason
    for reason in (
        FailureReason.AGENT_LOST,
        FailureReason.BUILD_INFRA,
        FailureReason.RUNNER_INFRA,
        FailureReason.START_TIMEOUT,
        FailureReason.PREEMPTED,
    ):
        assert wait_after(reason) == timedelta(seconds=5 + 2), reason  # the second failed attempt


def test_an_attempt_whose_run_the_job_finished_while_away_succeeds() -> None:
    running = lifecycle.progress(leased(), 1, ItemState.RUNNING, T0)

    ended = lifecycle.finished_while_away(running, T0, exit_code=None)

    assert (ended.state, ended.reason, ended.attempt) == (ItemState.SUCCEEDED, None, 1)
    assert ended.message == "completed while its agent was unreachable"
    assert ended.history[-1].from_state is ItemState.RUNNING
    with pytest.raises(FailedPrecondition):
        lifecycle.finished_while_away(ended, T0)


def test_job_failure_is_final_unless_the_queue_retries_them() -> None:
    failed = lifecycle.complete(
        leased(),
        1,
        ItemState.FAILED,
        T0,
        NO_RETRY,
        reason=FailureReason.JOB_FAILED,
        exit_code=3,
    )
    retried = lifecycle.complete(
        leased(),
        1,
        ItemState.FAILED,
        T0,
        RetryPolicy(retry_job_failures=True),
        reason=FailureReason.JOB_FAILED,
    )

    assert (failed.state, failed.reason, failed.exit_code) == (ItemState.FAILED, FailureReason.JOB_FAILED, 3)
    assert retried.state is ItemState.PENDING


def test_no_attempts_left_fails_with_the_reason_kept() -> None:
    item = lifecycle.end_attempt(leased(max_attempts=1), FailureReason.START_TIMEOUT, T0, NO_RETRY)

    assert (item.state, item.reason) == (ItemState.FAILED, FailureReason.START_TIMEOUT)


def test_cancel_pending_is_immediate_and_cancel_leased_waits_for_the_agent() -> None:
    pending = lifecycle.request_cancel(lifecycle.enqueued("i1", 3, T0), T0)
    flagged = lifecycle.request_cancel(leased(), T0)

    assert pending.state is ItemState.CANCELLED
    assert (flagged.state, flagged.cancel_requested) == (ItemState.LEASED, True)
    lost = lifecycle.end_attempt(flagged, FailureReason.AGENT_LOST, T0, NO_RETRY)
    assert lost.state is ItemState.CANCELLED  # never retried once a cancel was requested


def test_cancelled_outcome_needs_a_cancel_request() -> None:
    with pytest.raises(FailedPrecondition, match="no cancel was requested"):
        lifecycle.complete(leased(), 1, ItemState.CANCELLED, T0, NO_RETRY)


def test_release_is_refused_once_running() -> None:
    running = lifecycle.progress(leased(), 1, ItemState.RUNNING, T0)

    with pytest.raises(FailedPrecondition) as refused:
        lifecycle.release(running, 1, T0, NO_RETRY)
    assert refused.value.reason == "INVALID_TRANSITION"
    assert lifecycle.release(leased(), 1, T0, NO_RETRY).state is ItemState.PENDING


def test_cancel_of_an_ended_item_is_refused() -> None:
    done = lifecycle.complete(leased(), 1, ItemState.SUCCEEDED, T0, NO_RETRY)

    with pytest.raises(FailedPrecondition) as refused:
        lifecycle.request_cancel(done, T0)
    assert refused.value.reason == "ITEM_ENDED"


OUTCOMES = st.sampled_from([ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED])
REASONS = st.sampled_from(list(FailureReason))
PROGRESS = st.sampled_from([ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING])
PROGRESS_ORDER = [ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING]


def after_failure(item: ItemLife, reason: FailureReason, policy: RetryPolicy) -> ItemState:
    """Where the state table of docs/design.md §5 sends a live item whose attempt ended without success."""
    if item.cancel_requested:
        return ItemState.CANCELLED
    retryable = reason.is_infrastructure or (
        policy.retry_job_failures and reason is not FailureReason.CANCELLED
    )
    return ItemState.PENDING if retryable and item.attempt < item.max_attempts else ItemState.FAILED


class ItemLifeCycle(RuleBasedStateMachine):
    """Drives one item with every message an agent or user can send, valid or not. Each rule states what
    the state table allows from where the item is: an allowed move must be taken, to the state the table
    names; any other must be refused, changing nothing."""

    item: ItemLife
    policy: RetryPolicy

    @initialize(max_attempts=st.integers(1, 4), retry_job_failures=st.booleans())
    def enqueue(self, max_attempts: int, retry_job_failures: bool) -> None:
        self.item = lifecycle.enqueued("i1", max_attempts, T0)
        self.policy = RetryPolicy(retry_job_failures=retry_job_failures)
        self.clock = T0
        self.ended_as: ItemState | None = None

    def _now(self) -> datetime:
        self.clock += timedelta(seconds=1)
        return self.clock

    def _expect(self, allowed_to: ItemState | None, change: Callable[[ItemLife], ItemLife]) -> None:
        """``allowed_to``: the state the table moves the item to, or None when it forbids the move."""
        before = self.item
        if allowed_to is None:
            with pytest.raises(FailedPrecondition):
                change(before)
            return
        self.item = change(before)
        assert self.item.state is allowed_to

    @rule(agent=st.sampled_from(["agents/a", "agents/b"]))
    def assign(self, agent: str) -> None:
        allowed = self.item.state is ItemState.PENDING
        now = self._now()
        self._expect(ItemState.LEASED if allowed else None, lambda item: lifecycle.assign(item, agent, now))

    @rule(state=PROGRESS, stale=st.booleans())
    def progress(self, state: ItemState, stale: bool) -> None:
        epoch = self.item.epoch - 1 if stale else self.item.epoch
        if stale and self.item.state.is_live:
            with pytest.raises(LeaseLost):
                lifecycle.progress(self.item, epoch, state, self._now())
            return
        current = self.item.state
        forward = current.is_live and PROGRESS_ORDER.index(state) >= PROGRESS_ORDER.index(current)
        now = self._now()
        self._expect(state if forward else None, lambda item: lifecycle.progress(item, epoch, state, now))

    @rule(outcome=OUTCOMES, reason=REASONS)
    def complete(self, outcome: ItemState, reason: FailureReason) -> None:
        item = self.item
        expected: ItemState | None = None
        if item.state.is_live:
            if outcome is ItemState.SUCCEEDED:
                expected = ItemState.SUCCEEDED
            elif outcome is ItemState.FAILED or item.cancel_requested:
                expected = after_failure(item, reason, self.policy)
        now = self._now()
        self._expect(
            expected,
            lambda item: lifecycle.complete(item, item.epoch, outcome, now, self.policy, reason=reason),
        )

    @rule(reason=REASONS)
    def lease_ends(self, reason: FailureReason) -> None:
        expected = after_failure(self.item, reason, self.policy) if self.item.state.is_live else None
        now = self._now()
        self._expect(expected, lambda item: lifecycle.end_attempt(item, reason, now, self.policy))

    @rule()
    def run_finished_while_away(self) -> None:
        expected = ItemState.SUCCEEDED if self.item.state.is_live else None
        now = self._now()
        self._expect(expected, lambda item: lifecycle.finished_while_away(item, now))

    @rule()
    def release(self) -> None:
        allowed = self.item.state.is_live and self.item.state is not ItemState.RUNNING
        expected = after_failure(self.item, FailureReason.RELEASED, self.policy) if allowed else None
        now = self._now()
        self._expect(expected, lambda item: lifecycle.release(item, item.epoch, now, self.policy))

    @rule()
    def cancel(self) -> None:
        state = self.item.state
        expected = {ItemState.PENDING: ItemState.CANCELLED, ItemState.CANCELLED: ItemState.CANCELLED}.get(
            state, state if state.is_live else None
        )
        now = self._now()
        self._expect(expected, lambda item: lifecycle.request_cancel(item, now))
        if expected is not None:
            assert self.item.cancel_requested

    @precondition(lambda self: self.item.state.is_terminal)
    @rule()
    def stays_ended(self) -> None:
        if self.ended_as is None:
            self.ended_as = self.item.state
        assert self.item.state is self.ended_as

    @invariant()
    def attempts_and_epochs_march_together(self) -> None:
        assert self.item.epoch == self.item.attempt <= self.item.max_attempts

    @invariant()
    def a_cancel_request_never_returns_to_pending(self) -> None:
        if self.item.cancel_requested:
            assert self.item.state is not ItemState.PENDING

    @invariant()
    def history_is_a_chain_ending_in_the_state(self) -> None:
        history = self.item.history
        assert history[0].from_state is None
        for earlier, later in itertools.pairwise(history):
            assert later.from_state is earlier.to_state
            assert later.time >= earlier.time
        assert history[-1].to_state is self.item.state

    @invariant()
    def a_retried_item_waits_its_back_off(self) -> None:
        last = self.item.history[-1]
        if self.item.state is ItemState.PENDING and last.reason is not None:
            wait = (
                lifecycle.infrastructure_backoff(self.item.attempt) if last.reason.backs_off else timedelta(0)
            )
            assert self.item.eligible_time == last.time + wait

    @invariant()
    def place_in_the_queue_is_kept(self) -> None:
        assert self.item.enqueue_time == T0

    @invariant()
    def failures_are_explained(self) -> None:
        if self.item.state in (ItemState.FAILED, ItemState.CANCELLED):
            assert self.item.reason is not None

    @invariant()
    def a_lease_is_known_while_live(self) -> None:
        if self.item.state.is_live:
            assert self.item.assign_time is not None
        if self.item.state is ItemState.RUNNING:
            assert self.item.running_since is not None
        assert (self.item.end_time is not None) is self.item.state.is_terminal


TestItemLifeCycle = ItemLifeCycle.TestCase
