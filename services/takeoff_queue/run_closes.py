"""Closing the runs of attempts the queue ends without their agent (docs/design.md §16).

When the queue ends an attempt itself (the lease expired, the agent came back without it, a start
timeout or max run time backstop, the queue was deleted), the attempt's run must still reach a final
state, and the registry may be away just then. So the close is written to an outbox (a table of pending
calls) in the transaction that records why, and :class:`RunCloser` drains it: it sets the run KILLED
through RunService.FinishRun and retries with jittered back-off until the registry answers. A registry
outage delays a close, never loses it.

FinishRun keeps the first final state, so its answer also says whether the job finished the run before
the queue closed it (the SDK's finish while its agent was unreachable): that attempt's work is done, and
its item ends SUCCEEDED instead of being tried again. Until the answer comes, the item is not dispatched:
running it again might run it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from takeoff_queue.lifecycle import FailureReason

logger = logging.getLogger(__name__)

CLAIM_HOLD = timedelta(seconds=10)
"""How long a drainer keeps the rows it claimed from every other: past one registry call (5 s at most)
and the commit of its answer. The rows of a drainer that dies meanwhile (a queue restart) are tried
again after this."""
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 10.0
"""The longest wait between two tries of one close: a registry back from an outage closes every run
within about this much."""
CLAIM_BATCH = 32
REVOCATION_BATCH = 256
"""Runs revoked by one BatchRevokeRunTokens call (the registry takes up to 1000)."""


@dataclass(frozen=True, slots=True)
class RunClose:
    """One row of the outbox: a run to set KILLED, and the attempt that waits for the answer."""

    run: str
    """``projects/{p}/runs/{run}``"""
    message: str
    """Why the queue ended the attempt (the item's message; the run's, after the reason)."""
    reason: FailureReason | None = None
    """What the attempt ends with unless the job finished the run (None: no item waits)."""
    item_id: str = ""
    """The item whose attempt waits for the answer; "" when none does (its queue was deleted)."""
    epoch: int = 0
    """The attempt's epoch: the answer applies to that attempt only."""
    id: int = 0
    """The row's id (0 before it is stored)."""
    tries: int = 0
    """Tries that failed so far."""

    @property
    def run_message(self) -> str:
        """The run's final message."""
        if self.reason is None:
            return f"closed by the queue: {self.message}"
        return f"closed by the queue ({self.reason.value}): {self.message}"


@dataclass(frozen=True, slots=True)
class RunEnd:
    """What FinishRun answered: whether the job had finished the run before the queue closed it."""

    finished: bool
    exit_code: int | None = None


class RunCloseFailed(Exception):
    """The registry did not answer FinishRun (or answered an error other than "no such run")."""


class RunRegistry(Protocol):
    async def close_run(self, run: str, message: str) -> RunEnd:
        """Set the run KILLED unless it has ended already; a run that does not exist counts as closed
        (the agent never created it). Raises :class:`RunCloseFailed`."""
        ...


class RunCloseStore(Protocol):
    async def claim_run_closes(self, now: datetime, hold_until: datetime, limit: int) -> list[RunClose]: ...

    async def retry_run_close(self, close: RunClose, next_try_time: datetime, error: str) -> None: ...

    async def next_run_close_time(self) -> datetime | None: ...


Settle = Callable[[RunClose, RunEnd], Awaitable[None]]
"""Records the answer: deletes the row and moves the waiting item on, in one transaction."""


def backoff(tries: int, rng: random.Random) -> timedelta:
    """Full jitter below ``min(10 s, 0.5 s * 2^(tries - 1))``: closes that failed together (a registry
    outage) come back spread out."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** min(tries - 1, 8))
    return timedelta(seconds=rng.uniform(0, ceiling))


class _Drainer:
    """Drains an outbox: woken by every new row committed here, and otherwise when the next row is due;
    it does not poll. Several drainers (queue replicas) may share one database: each claims the rows it
    tries."""

    _what = "run closes"

    def __init__(self, clock: Callable[[], datetime], rng: random.Random | None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._failures = 0
        """Rounds in a row that failed in the store: the drainer backs off the store too."""

    def wake(self) -> None:
        """New rows were committed: try them now."""
        self._wakeup.set()

    async def drain_forever(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                # After a round that tried rows, look again at once: a try that failed is due again after
                # its back-off, and rows beyond the claimed batch are due now; no wake will come for them.
                tried = await self.drain_due()
                wait = 0.0 if tried else await self._until_next_due()
                self._failures = 0
            except Exception:  # the store failed: the rows are still there for the next round
                self._failures += 1
                logger.exception("the outbox of %s could not be drained; trying again", self._what)
                wait = backoff(self._failures, self._rng).total_seconds()
            if wait is None or wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)

    async def _until_next_due(self) -> float | None:
        due = await self._next_due()
        return None if due is None else max(0.0, (due - self._clock()).total_seconds())

    async def _next_due(self) -> datetime | None:
        raise NotImplementedError

    async def drain_due(self) -> int:
        raise NotImplementedError


class RunCloser(_Drainer):
    """Drains the outbox of run closes."""

    def __init__(
        self,
        store: RunCloseStore,
        registry: RunRegistry,
        settle: Settle,
        clock: Callable[[], datetime],
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock, rng)
        self._store = store
        self._registry = registry
        self._settle = settle

    async def _next_due(self) -> datetime | None:
        return await self._store.next_run_close_time()

    async def drain_due(self) -> int:
        """Try every row due now (one claimed batch); returns how many were tried."""
        now = self._clock()
        claimed = await self._store.claim_run_closes(now, now + CLAIM_HOLD, CLAIM_BATCH)
        await asyncio.gather(*(self._close(close) for close in claimed))
        return len(claimed)

    async def _close(self, close: RunClose) -> None:
        try:
            end = await self._registry.close_run(close.run, close.run_message)
        except RunCloseFailed as error:
            delay = backoff(close.tries + 1, self._rng)
            logger.info(
                "closing run %s failed (try %d), again in %s: %s", close.run, close.tries + 1, delay, error
            )
            await self._store.retry_run_close(close, self._clock() + delay, str(error)[:1000])
            return
        await self._settle(close, end)


# ----- run tokens (docs/design.md §13) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocation:
    """One row of the outbox of token revocations: a run whose attempt ended."""

    run: str
    id: int = 0
    tries: int = 0


class TokenCallFailed(Exception):
    """The registry did not mint or revoke (unreachable, or it refused)."""


class RunTokens(Protocol):
    def signed_run_token(self, run: str, item: str, job_version: str, secrets: Sequence[str]) -> str | None:
        """A run token made at once, with no call; None when it needs one (:meth:`mint_run_token`)."""
        ...

    async def mint_run_token(self, run: str, item: str, job_version: str, secrets: Sequence[str]) -> str:
        """A new run token's secret. Raises :class:`TokenCallFailed`."""
        ...

    async def revoke_run_tokens(self, runs: Sequence[str]) -> None:
        """Revoke every token of ``runs`` (idempotent), in one call. Raises :class:`TokenCallFailed`."""
        ...


class RevocationStore(Protocol):
    async def claim_token_revocations(
        self, now: datetime, hold_until: datetime, limit: int
    ) -> list[Revocation]: ...

    async def retry_token_revocations(
        self, retries: Sequence[tuple[Revocation, datetime]], error: str
    ) -> None: ...

    async def tokens_revoked(self, revocations: Sequence[Revocation]) -> None: ...

    async def next_token_revocation_time(self) -> datetime | None: ...


class TokenRevoker(_Drainer):
    """Drains the outbox of token revocations: each ended attempt's run tokens are revoked in the registry,
    retried with the same back-off as run closes until it answers; a registry outage delays a revocation,
    never loses it."""

    _what = "token revocations"

    def __init__(
        self,
        store: RevocationStore,
        tokens: RunTokens,
        clock: Callable[[], datetime],
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock, rng)
        self._store = store
        self._tokens = tokens

    async def _next_due(self) -> datetime | None:
        return await self._store.next_token_revocation_time()

    async def drain_due(self) -> int:
        """Revoke the due runs' tokens in one registry call (BatchRevokeRunTokens), which succeeds or fails
        for all of them: one call per batch, not per ended attempt."""
        now = self._clock()
        claimed = await self._store.claim_token_revocations(now, now + CLAIM_HOLD, REVOCATION_BATCH)
        if not claimed:
            return 0
        try:
            await self._tokens.revoke_run_tokens([revocation.run for revocation in claimed])
        except TokenCallFailed as error:
            now = self._clock()
            retries = [(revocation, now + backoff(revocation.tries + 1, self._rng)) for revocation in claimed]
            await self._store.retry_token_revocations(retries, str(error)[:1000])
            logger.info(
                "revoking the tokens of %d runs (%s first) failed, again after a back-off: %s",
                len(claimed),
                claimed[0].run,
                error,
            )
            return len(claimed)
        await self._store.tokens_revoked(claimed)
        return len(claimed)
