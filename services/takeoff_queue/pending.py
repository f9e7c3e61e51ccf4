"""Why a PENDING item is not running yet, in the terms dispatch decides by (docs/design.md §5, "Order and
limits"): plain values and one pure function; the dispatcher gathers the facts.

The reasons are tried in queue.proto's order (`PendingReason`), and the first that holds is the answer: the
one the item would still meet once those before it cleared. Agents report no GPUs to the queue (a Hello
carries resource kinds and a number of slots), so no item is said to wait for GPUs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import datetime


class PendingReason(enum.Enum):
    QUEUE_PAUSED = "QUEUE_PAUSED"
    RETRY_BACKOFF = "RETRY_BACKOFF"
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
    NO_AGENT = "NO_AGENT"
    AGENTS_BUSY = "AGENTS_BUSY"
    QUEUED = "QUEUED"


@dataclass(frozen=True, slots=True)
class QueueOutlook:
    """What a queue's PENDING items wait for, at one moment."""

    paused: bool
    live: int
    """Items held under a lease now (and being leased): what the concurrency limit counts."""
    concurrency_limit: int
    """0: unlimited."""
    agents: int
    """Connected agents that serve the queue."""
    free_slots: int
    """Their room for new work now: none while an agent drains or has stopped renewing its leases."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """A PENDING item's place in its queue's dispatch order (1: offered first) and why it waits."""

    position: int
    reason: PendingReason
    detail: str


def why_pending(
    eligible_time: datetime,
    position: int,
    queue: QueueOutlook,
    now: datetime,
    *,
    assigning: bool = False,
    token_refused: bool = False,
) -> Waiting:
    """Why an item at ``position`` of ``queue``, eligible from ``eligible_time``, is PENDING at ``now``.
    ``assigning``: a dispatch pass has taken it and holds an agent's slot and the queue's for it (while its
    run token is minted, or its lease is committed); ``token_refused``: the registry gave no run token for
    its next attempt, and minting is tried again after a back-off."""
    reason, detail = _reason(
        eligible_time, position, queue, now, assigning=assigning, token_refused=token_refused
    )
    return Waiting(position, reason, detail)


def _reason(
    eligible_time: datetime,
    position: int,
    queue: QueueOutlook,
    now: datetime,
    *,
    assigning: bool,
    token_refused: bool,
) -> tuple[PendingReason, str]:
    if queue.paused:
        return PendingReason.QUEUE_PAUSED, "the queue is paused"
    if eligible_time > now:
        wait = math.ceil((eligible_time - now).total_seconds())
        return PendingReason.RETRY_BACKOFF, f"retry in {wait}s"
    if assigning:  # the slots it holds must not count against it
        return PendingReason.QUEUED, "being assigned"
    if queue.concurrency_limit and queue.live >= queue.concurrency_limit:
        return PendingReason.CONCURRENCY_LIMIT, f"{queue.live} of {queue.concurrency_limit} running"
    if not queue.agents:
        return PendingReason.NO_AGENT, "no connected agent serves the queue"
    if not queue.free_slots:
        agents = f"{queue.agents} agent{'s' if queue.agents > 1 else ''}"
        return PendingReason.AGENTS_BUSY, f"{agents}, 0 free slots"
    if token_refused:  # tried when an agent has room for it: only then does the token hold it back
        return PendingReason.QUEUED, "its run token is tried again: the registry did not give one"
    if position > 1:
        ahead = position - 1
        return PendingReason.QUEUED, f"{ahead} item{'s' if ahead > 1 else ''} ahead"
    # Nothing holds it back: the dispatch pass leasing it runs on the event loop's next turn (or its run
    # token is being minted).
    return PendingReason.QUEUED, "next to be assigned"
