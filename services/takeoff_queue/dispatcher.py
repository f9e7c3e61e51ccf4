"""The dispatcher: which item goes to which agent, when, and what happens when an agent goes quiet.

It owns the in-memory index of the live part of the service (queues, pending and leased items, agents)
and changes items only through the life-cycle functions. Every change is committed (group commit)
before it is acknowledged or pushed to an agent; a change whose commit fails is rolled back here, so
that the index always says what the store says. Dispatch is push: whenever work becomes eligible or an
agent gains capacity, a dispatch pass runs on the next turn of the event loop; nothing polls. One item or
queue that fails in a pass is logged and set aside; the pass goes on with the others.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import random
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from takeoff_queue import lifecycle, tracing
from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, LeaseLost
from takeoff_queue.metrics import QueueMetrics
from takeoff_queue.model import (
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
    LeaseVerdict,
    MessageKind,
    Progress,
    Queue,
    Reject,
    RejectReason,
    Release,
    Revoke,
    RevokeReason,
    SessionClosed,
    SetCapacity,
    Welcome,
    merged_mounts,
)
from takeoff_queue.pending import PendingReason, QueueOutlook, Waiting, why_pending
from takeoff_queue.queue_watch import QueueChanges
from takeoff_queue.run_closes import (
    RunClose,
    RunCloser,
    RunEnd,
    RunRegistry,
    RunTokens,
    TokenCallFailed,
    TokenRevoker,
    backoff,
)
from takeoff_queue.store import LineKey, Outbox, QueueStore, QueueWrite, newer_revision, next_revision
from takeoff_server.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from takeoff_server.random_ids import random_hex

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_ENDED_LEASES_REMEMBERED = 10_000
_TRIES_AGAINST_REPLICAS = 5
_REFRESH_BATCH = 500
_OVER_LIMIT_WAIT = timedelta(seconds=0.5)
LIVE_STATES = tuple(state for state in ItemState if state.is_live)
"""Writes another replica beat, each after reading what it wrote, before a change is given up."""
READ_BACK_LEAD = timedelta(seconds=1)
"""An item waiting out a retry's delay that the index left in the database is read back this long before its
wait ends, so that dispatch finds it at hand then; one whose wait ends sooner stays in the index."""
MINT_TIMEOUT_SECONDS = 5.0
"""How long an item's run token may take: past it, the item waits PENDING and is tried again later."""


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    ttl: timedelta = timedelta(seconds=30)
    heartbeat_interval: timedelta = timedelta(seconds=10)


@dataclass(eq=False)
class _Backlog:
    """A queue's PENDING items that the index left in the database (docs/design.md §9 "The queue's
    in-memory index"): ``count`` of them, each after ``after`` in dispatch order, while every PENDING item
    up to ``after`` is in the index (None: none is yet, the line is read again from its start)."""

    after: LineKey | None
    count: int
    last: LineKey | None = None
    """The greatest key among them, once known: a new item's in a FIFO queue."""
    arrivals: list[Item] | None = None
    """While the next page is read (None otherwise): items enqueued meanwhile and left in the database,
    taken in with the page when it reaches past them."""
    gone: set[str] = field(default_factory=set)
    """While the next page is read: items cancelled meanwhile, which the page may have read PENDING."""


@dataclass(frozen=True, slots=True)
class _Resting:
    """A PENDING item waiting out a retry's delay that the index left in the database (docs/design.md §9
    "The queue's in-memory index"): what it keeps of it, besides its due time on the timer, to read it back
    when due and to count and place it meanwhile."""

    queue: str
    priority: int
    seq: int
    epoch: int


@dataclass(eq=False)
class _RestingItems:
    """The PENDING items waiting out a retry's delay that the index left in the database, and those of them
    due and being read back."""

    by_id: dict[str, _Resting] = field(default_factory=dict)
    due: dict[str, dict[str, LineKey]] = field(default_factory=dict)
    """queue -> its resting items due whose read has not landed, with their keys: no item that sorts after
    one of them is dispatched meanwhile"""
    reading: set[str] = field(default_factory=set)
    """items whose read back is under way"""
    to_read: list[str] = field(default_factory=list)
    """items whose read back was asked for in this turn of the event loop: read together on the next"""
    read: dict[str, Item] = field(default_factory=dict)
    """items read back ahead of their due time (at most :data:`READ_BACK_LEAD`): indexed when due"""


class ItemChanged(Exception):
    """Another replica changed these items first: the write was refused, and the index now holds what the
    database says (docs/design.md §5 "Several queue replicas")."""

    def __init__(self, item_ids: set[str]) -> None:
        super().__init__(f"changed by another replica: {', '.join(sorted(item_ids))}")
        self.item_ids = item_ids


class Session:
    """One open Lease stream. The API layer writes what arrives in ``outbox`` to the stream."""

    def __init__(self, agent: Agent, session_id: str) -> None:
        self.agent = agent
        self.session_id = session_id
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.open = True

    def send(self, message: Any) -> None:
        if self.open:
            self.outbox.put_nowait(message)

    def close(self, *, superseded: bool) -> None:
        self.send(SessionClosed(superseded=superseded))
        self.open = False


class _Deadlines:
    """Every deadline (lease expiry, start timeout, max run time, retry delay) on one event-loop timer.

    Entries are never removed early: when one comes due, the dispatcher checks it still applies.
    """

    def __init__(self, clock: Clock, on_due: Callable[[str, str, int], None]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._heap: list[tuple[datetime, int, str, str, int]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: datetime | None = None

    def at(self, when: datetime, kind: str, key: str, epoch: int = 0) -> None:
        heapq.heappush(self._heap, (when, next(self._order), kind, key, epoch))
        if self._armed_for is None or when < self._armed_for:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_for = None, None
        if self._heap:
            self._armed_for = self._heap[0][0]
            delay = max(0.0, (self._armed_for - self._clock()).total_seconds())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_for = None, None
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, key, epoch = heapq.heappop(self._heap)
            try:
                self._on_due(kind, key, epoch)
            except Exception:  # one deadline that fails must not drop the others
                logger.exception("the %s deadline of %s failed", kind, key)
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Dispatcher:
    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        timing: LeaseTiming,
        runs: RunRegistry,
        tokens: RunTokens | None = None,
        *,
        metrics: QueueMetrics | None = None,
        replicated: bool = False,
        pending_window: int | None = None,
    ) -> None:
        self._store = store
        # Replicated: other queue processes share the database; the index is a cache of it, kept fresh
        # from their notifications; claims are conditional writes; lease expiry is the database's (§5).
        self._replicated = replicated
        # How many PENDING items of each queue the index holds at most, besides those that come back from
        # agents (None: all). Replicas hold all: their index is a cache that the other replicas'
        # notifications keep fresh, item by item. The rest of each queue's line is its backlog.
        self._window = None if replicated else pending_window
        self._backlogs: dict[str, _Backlog] = {}
        self._resting = _RestingItems()
        self.metrics = metrics or QueueMetrics()
        # Mints each attempt's run token before the item is leased; None: no tokens (tests of dispatch alone).
        self._tokens = tokens
        self._run_tokens: dict[str, tuple[str, str]] = {}
        """item id -> (run, token secret) minted for its next (or current) attempt; in memory only."""
        self._minting: dict[str, str] = {}
        """PENDING items whose token is being minted: out of the queue's index meanwhile."""
        # item id -> mints in a row that failed: it waits longer before the next try.
        self._mint_failures: dict[str, int] = defaultdict(int)
        self._rng = random.Random()
        self._clock = clock
        self.timing = timing
        self.queues: dict[str, Queue] = {}
        self.items: dict[str, Item] = {}  # every item not yet ended, by id
        self.agents: dict[str, Agent] = {}
        self._sessions: dict[str, Session] = {}
        self._pending: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        """queue -> heap of (priority rank, enqueue seq, item id)"""
        self._lines: dict[str, list[tuple[int, int]]] = {}
        """queue -> its heap's PENDING items in order, as keys: taken when an item's position is read, and
        dropped whenever the heap or one of its items changes"""
        self._live: dict[str, int] = defaultdict(int)
        """queue -> items LEASED..RUNNING (and new ones being committed leased), for concurrency limits"""
        self._arriving: dict[str, int] = defaultdict(int)
        """queue -> new PENDING items being committed: older than any item enqueued meanwhile"""
        self._leases: dict[str, str] = {}
        """lease id -> item id, for every lease held now"""
        self._ended_leases: OrderedDict[str, tuple[int, ItemState, bool]] = OrderedDict()
        """lease id -> (epoch, item state after it ended, ended by the agent's Complete)"""
        # Leases this queue is ending (an expiry, a timeout), the close not committed yet: a commit that
        # fails, or finds that the agent renewed meanwhile, gives them back.
        self._closes_committing: set[str] = set()
        self._set_aside: dict[str, set[str]] = defaultdict(set)
        """queue -> PENDING items a dispatch pass failed to assign; tried again when the queue changes"""
        # item id -> the life last handed to the store and the row's revision once it is written, until
        # that write is committed; _writes_ended is set, and replaced, each time a write of items ends.
        self._writing: dict[str, tuple[ItemLife, int]] = {}
        # New items between admit and their admission (or not_admitted): set when it is done.
        self._admitting: dict[str, asyncio.Event] = {}
        self._writes_ended = asyncio.Event()
        self._dispatch_scheduled = False
        self._deadlines = _Deadlines(clock, self._on_deadline)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: dict[str, set[asyncio.Queue[Item]]] = defaultdict(set)
        self._reasons_told: dict[str, PendingReason | None] = {}
        """watched item id -> why it waited, PENDING, when its watchers were last woken (or began)"""
        self._queue_watchers: dict[str, set[QueueChanges]] = {}
        """queue -> what changed in it, gathered for each of its WatchQueue streams"""
        self._closing: dict[str, RunClose] = {}
        """item id -> the run close that its attempt, ended by the queue, waits for (docs/design.md §16):
        held by no agent and out of dispatch until the registry answers"""
        self.run_closer = RunCloser(store, runs, self._run_closed, clock)
        self.token_revoker = TokenRevoker(store, tokens, clock) if tokens is not None else None
        self._drainers: list[asyncio.Task[None]] = []  # the outboxes' (run closes, token revocations)

    @property
    def replicated(self) -> bool:
        return self._replicated

    @property
    def pending_window(self) -> int | None:
        return self._window

    # ----- start and stop ---------------------------------------------------------------------

    def restore(
        self,
        queues: Iterable[Queue],
        items: Iterable[Item],
        run_closes: Iterable[RunClose],
        pending: Mapping[str, int],
    ) -> None:
        """Rebuild the index from the store and start draining the outbox of run closes. Every lease gets
        one TTL of grace from now (docs/design.md §5), except those whose attempt the queue had ended:
        they wait for their run's close again. ``pending``: each queue's PENDING items in the database;
        those beyond the ones in ``items`` (each queue's first, in dispatch order) are left there."""
        grace_until = self._clock() + self.timing.ttl
        self.queues = {queue.name: queue for queue in queues}
        waiting = {(close.item_id, close.epoch): close for close in run_closes if close.item_id}
        for item in items:
            close = waiting.get((item.id, item.life.epoch))
            if close is not None and item.state.is_live:
                self.items[item.id] = item
                self._closing[item.id] = close
                self._ended_leases[item.lease_id] = (item.life.epoch, item.state, False)
            else:
                self._take_in(item)
        self._note_backlogs(pending)
        for agent in self.agents.values():
            # One process: each got its TTL of grace as its first lease was held (_hold). Replicas: the
            # database's expiry decides, extended at start (ReplicaSync).
            if agent.lease_expiry is None:
                agent.lease_expiry = grace_until
        self._store.drain_with(Outbox.RUN_CLOSES, self.run_closer.wake)
        self._drainers.append(asyncio.create_task(self.run_closer.drain_forever()))
        if self.token_revoker is not None:
            self._store.drain_with(Outbox.TOKEN_REVOCATIONS, self.token_revoker.wake)
            self._drainers.append(asyncio.create_task(self.token_revoker.drain_forever()))

    def _note_backlogs(self, pending: Mapping[str, int]) -> None:
        loaded: dict[str, list[LineKey]] = defaultdict(list)
        for item in self.items.values():
            if item.state is ItemState.PENDING:
                loaded[item.queue].append(self._key(item))
        for rest in self._resting.by_id.values():
            loaded[rest.queue].append(self._resting_key(rest))
        for name in self.queues:
            left = pending.get(name, 0) - len(loaded[name])
            if left > 0:
                self._backlogs[name] = _Backlog(max(loaded[name], default=None), left)

    async def stop(self) -> None:
        for drainer in self._drainers:
            drainer.cancel()
        await asyncio.gather(*self._drainers, return_exceptions=True)
        self._deadlines.stop()
        for session in list(self._sessions.values()):
            session.close(superseded=False)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- queues and items (called by the queue book) -----------------------------------------

    def put_queue(self, queue: Queue) -> None:
        previous = self.queues.get(queue.name)
        self.queues[queue.name] = queue
        if previous is not None and previous.prioritization != queue.prioritization:
            self._reorder(queue.name)
        for item_id in self._set_aside.pop(queue.name, ()):
            if (item := self.items.get(item_id)) is not None and item.state is ItemState.PENDING:
                self._queue_up(item)
        self._schedule_dispatch()

    def runs_to_close(self, queue: str) -> list[RunClose]:
        """The runs of the queue's live attempts, to close in the transaction that deletes it (the outbox
        rows of attempts already waiting for their close stay, and are closed alike)."""
        return [
            RunClose(item.life.run, "its queue was deleted")
            for item in self.items.values()
            if item.queue == queue and item.state.is_live and not self._waits_for_close(item)
        ]

    def drop_queue(self, name: str) -> list[Item]:
        """Forget a queue whose deletion is committed; its leased items are revoked."""
        self.queues.pop(name, None)
        self._backlogs.pop(name, None)
        for item_id in [item_id for item_id, rest in self._resting.by_id.items() if rest.queue == name]:
            self._unrest(item_id)
        self._pending.pop(name, None)
        self._lines.pop(name, None)
        self._set_aside.pop(name, None)
        for changes in self._queue_watchers.pop(name, ()):
            changes.queue_deleted()
        dropped = [item for item in self.items.values() if item.queue == name]
        for item in dropped:
            # An attempt waiting for its run's close has no lease left to revoke; its outbox row stays.
            if not self._waits_for_close(item) and item.state.is_live:
                self._send_to_holder(item, Revoke(item.lease_id, item.name, RevokeReason.QUEUE_DELETED, ""))
                self._release_hold(item, item.life, ended_by_agent=False)
            self._closing.pop(item.id, None)
            del self.items[item.id]
            self._forget_token(item)
        return dropped

    def admit(self, item: Item) -> Assignment | None:
        """Lease a new item at once when an agent can take it now, so that its first commit inserts it
        already LEASED: one transaction from Enqueue to Assignment instead of two (docs/design.md §5).

        The item enters no index before that commit: an agent's room and a slot of the queue's
        concurrency limit are held for it, or its queue counts it as arriving, until :meth:`admitted` or
        :meth:`not_admitted` settles it. Meanwhile a read of the store that finds it committed (a page, a
        refresh among replicas) leaves it to :meth:`admitted`, and a cancel waits for that
        (:meth:`admission_done`)."""
        try:
            agent = self._taker_of_new(item)
            if agent is not None:
                item.life = self._leased(item, agent)
        except Exception:  # the dispatch pass isolates what it cannot assign; Enqueue must not fail for it
            logger.exception("item %s could not be leased at Enqueue; it is inserted PENDING", item.name)
            agent = None
        if agent is None:
            self._arriving[item.queue] += 1
            self._admitting[item.id] = asyncio.Event()
            return None
        leased = self._assignment(item)
        agent.next_queue = (agent.queues.index(item.queue) + 1) % len(agent.queues)
        agent.leases_committing += 1
        self._live[item.queue] += 1
        self._admitting[item.id] = asyncio.Event()
        return leased

    async def admission_done(self, item_id: str) -> None:
        """Until the Enqueue that is committing the item has taken it in (or given it up)."""
        if (admission := self._admitting.get(item_id)) is not None:
            await admission.wait()

    def admitted(self, item: Item, leased: Assignment | None) -> None:
        """Take in a new item whose first commit is done; one leased by :meth:`admit` goes to its agent."""
        self._settle_admission(item)
        if self._in_backlog(item):
            self._left_in_database(item)
        else:
            self._index(item)
            if self._window is not None and len(self._pending[item.queue]) > 2 * self._window:
                self._trim(item.queue, self._window)
        self.metrics.enqueues[item.queue].inc()
        if leased is not None:
            self._send_to_holder(item, leased)
            self._assigned(item)
            holder = self.agents[item.life.agent.removeprefix("agents/")]
            if holder.lease_expiry is not None and holder.lease_expiry <= self._clock():
                # It stopped renewing during the commit, and its expiry was handled without this lease.
                self._deadlines.at(holder.lease_expiry, "expiry", holder.agent_id)
        self._notify(item)

    def not_admitted(self, item: Item) -> None:
        """The new item's first commit failed, or another try of its request made the item: it never
        existed here, and what :meth:`admit` held for it is free again (and a token minted for it is
        revoked)."""
        self._settle_admission(item)
        if item.state.is_live and (agent := self.agents.get(item.life.agent.removeprefix("agents/"))):
            self._forget_if_gone(agent)  # it may have left meanwhile
        minted = self._run_tokens.pop(item.id, None)
        if minted is not None:
            self._spawn(self._revoke_unused(minted[0]))

    def _taker_of_new(self, item: Item) -> Agent | None:
        """The agent a dispatch pass would hand the new item to now: its queue may assign and has nothing
        waiting or arriving ahead of it, and the agent is renewing its leases, has room, serves the queue,
        and has nothing waiting in the others its round robin would serve first."""
        queue = self.queues.get(item.queue)
        if queue is None or self._arriving[queue.name] or not self._may_assign_from(queue):
            return None
        if queue.name in self._backlogs or queue.name in self._resting.due:
            return None  # older items wait in the database, or are being read back from it
        if self._replicated and queue.concurrency_limit:
            return None  # its limit is counted in the database, at the claim (_deliver), not in this index
        if queue.name in self._minting.values():
            return None  # an older item of the queue waits for its token: it goes first
        now = self._clock()
        for agent in self.agents.values():
            if (
                self._may_receive(agent, now)
                and agent.free_capacity > 0
                and queue.name in agent.queues
                and not any(self._offers_work(name) for name in agent.queues)
            ):
                return agent
        return None

    def _settle_admission(self, item: Item) -> None:
        """Free what :meth:`admit` held for the item."""
        self._admitting.pop(item.id).set()
        if item.state.is_live:
            self.agents[item.life.agent.removeprefix("agents/")].leases_committing -= 1
            self._live[item.queue] -= 1
        else:
            self._arriving[item.queue] -= 1

    async def cancel(self, item: Item, message: str, *, actor: str = "") -> Item:
        """Cancel the item: one of the index, or one read from the store that the index left in the
        database (or, among replicas, has not seen yet)."""
        for _ in range(_TRIES_AGAINST_REPLICAS):
            left_in_database = self._in_backlog(item) or item.id in self._resting.by_id
            live = item.state.is_live and not self._waits_for_close(item)
            self._move(item, lifecycle.request_cancel(item.life, self._clock(), message, actor))
            # The agent is told by whichever replica holds its stream: here, or the one that reads this.
            notices = [(item, Cancel(item.lease_id, item.name, message))] if live else []
            try:
                await self._persist([item], then_send=notices)
            except ItemChanged:
                if left_in_database:
                    self._back_to_database(item)
                current = self.items.get(item.id)
                if current is None:
                    found = await self._store.items(item_ids=[item.id])
                    if not found or found[0].state.is_terminal:
                        return item  # it ended meanwhile: the caller reads how
                    current = found[0]
                item = current
                continue
            except BaseException:
                if left_in_database:
                    self._back_to_database(item)
                raise
            if left_in_database:
                await self._taken_from_database(item)
            return item
        raise Aborted("CONCURRENT_CHANGE", f"{item.name} kept changing on other replicas; try again")

    def watch(self, item_id: str) -> asyncio.Queue[Item]:
        """Updates of the item: after each committed change, and when a PENDING item's reason to wait
        changes. Called before the watcher reads the item, so that no change falls between."""
        updates: asyncio.Queue[Item] = asyncio.Queue()
        self._watchers[item_id].add(updates)
        item = self.items.get(item_id)
        if item is not None and item_id not in self._reasons_told:
            self._reasons_told[item_id] = self._reason_now(item, {}, self._clock())
        rest = self._resting.by_id.get(item_id)
        if rest is not None:  # a watched item waits in the index (_rests): read it back now
            read = self._resting.read.get(item_id)
            if read is not None and item_id not in self._writing:
                self._follow_watched(read)
            else:
                self._read_ahead(item_id, rest.epoch)
        return updates

    def unwatch(self, item_id: str, updates: asyncio.Queue[Item]) -> None:
        self._watchers[item_id].discard(updates)
        if not self._watchers[item_id]:
            del self._watchers[item_id]
            self._reasons_told.pop(item_id, None)

    def watch_queue(self, queue: str) -> QueueChanges:
        """What changes in the queue from now on: its items' committed changes, its agents', and each
        dispatch pass (positions and pending reasons may have moved). Called in the same turn of the event
        loop as the watcher reads the queue, so that no change falls between."""
        changes = QueueChanges(queue)
        self._queue_watchers.setdefault(queue, set()).add(changes)
        return changes

    def unwatch_queue(self, changes: QueueChanges) -> None:
        watchers = self._queue_watchers.get(changes.queue)
        if watchers is not None:
            watchers.discard(changes)
            if not watchers:
                del self._queue_watchers[changes.queue]

    def agent_count(self, queue: str) -> int:
        return sum(1 for agent in self.agents.values() if agent.connected and queue in agent.queues)

    # ----- why PENDING items wait (docs/design.md §5) ----------------------------------------------

    def waiting(self, items: Iterable[Item], ahead: Mapping[str, int] | None = None) -> dict[str, Waiting]:
        """By item id, each PENDING item's place in its queue's dispatch order and why it waits (items as
        the store has them, read by the caller). Each queue's order is taken once for all its items. An
        item left in the database is placed after the index's items, behind ``ahead[item id]`` of the
        others left there (without it: behind all of them, which a new item in a FIFO queue is)."""
        now = self._clock()
        outlooks: dict[str, QueueOutlook] = {}
        found = {}
        for item in items:
            if item.state is ItemState.PENDING and item.queue in self.queues:
                # Among the items eligible now; one waiting out a retry is shown the place it would take.
                line = self._waiting_line(item.queue)
                position = bisect.bisect_left(line, self._key(item)) + 1
                if ahead and item.id in ahead:
                    position += ahead[item.id]
                elif self._in_backlog(item):
                    position += max(self._backlogs[item.queue].count - 1, 0)
                found[item.id] = self._why(item, position, outlooks, now)
        return found

    async def waiting_now(self, items: Sequence[Item], *, committed: bool = False) -> dict[str, Waiting]:
        """:meth:`waiting`, with the items left in the database that sort ahead of each item counted there
        (for an item past the backlog's ``after``, whether the index holds it or not). ``committed``: the
        items are the answer of a write that committed, which a count the database fails must not turn
        into an error (the caller would write again): those places are :meth:`waiting`'s estimate then."""
        try:
            return self.waiting(items, await self._ahead_in_database(items))
        except Exception as error:
            if not committed:
                raise
            logger.warning("places of %d items not counted: %r", len(items), error)
            return self.waiting(items)

    async def _ahead_in_database(self, items: Sequence[Item]) -> dict[str, int]:
        behind: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            if self._past_after(item):
                backlog = self._backlogs[item.queue]
                if backlog.last is None:  # lost at a start or a reorder: one read on the index finds it
                    backlog.last = await self._store.last_pending_key(self.queues[item.queue])
                last = backlog.last
                if not self._in_backlog(item) or last is None or self._key(item) < last:
                    behind[item.queue].append(item)  # not a new last one, which is behind all of them
        ahead = {}
        for name, past in behind.items():
            backlog_now, queue = self._backlogs.get(name), self.queues.get(name)
            if backlog_now is None or queue is None:
                continue  # read out (or deleted) during an await: the index places them, as it holds the line
            past.sort(key=self._key)
            keys = [self._key(item) for item in past]
            after = backlog_now.after
            counts = await self._store.pending_ahead(queue, after, keys)
            line = self._waiting_line(name)
            start = bisect.bisect_right(line, after) if after is not None else 0
            for item, key, count in zip(past, keys, counts, strict=True):
                # The database counts the held PENDING items past ``after`` too: the line has them.
                ahead[item.id] = max(count - (bisect.bisect_left(line, key) - start), 0)
        return ahead

    async def counted_places(self, items: Iterable[Item]) -> dict[str, Waiting]:
        """The places of those of ``items`` (as the store has them) that sort past their queue's backlog
        key, counted in the database as GetItem counts them (:meth:`waiting_now`), or estimated where the
        count fails: WatchQueue takes the others from :meth:`waiting` and corrects these (review F12)."""
        past = [item for item in items if self._past_after(item)]
        return await self.waiting_now(past, committed=True) if past else {}

    def resting_ids(self, queue: str) -> list[str]:
        """The queue's items that wait out a retry's delay in the database, by id (read by WatchQueue)."""
        return [item_id for item_id, rest in self._resting.by_id.items() if rest.queue == queue]

    async def read_resting(self, item_ids: Sequence[str]) -> list[Item]:
        """Those of these items still resting, as the database has them."""
        found: list[Item] = []
        for start in range(0, len(item_ids), _REFRESH_BATCH):
            batch = item_ids[start : start + _REFRESH_BATCH]
            found += await self._store.items(item_ids=batch, states=[ItemState.PENDING])
        return [item for item in found if item.id in self._resting.by_id]

    def open_items(self, queue: str) -> int:
        """The queue's items not yet ended: those in the index and those left in the database."""
        backlog = self._backlogs.get(queue)
        held = sum(1 for item in self.items.values() if item.queue == queue)
        resting = sum(1 for rest in self._resting.by_id.values() if rest.queue == queue)
        return held + resting + (backlog.count if backlog is not None else 0)

    def front_of_line(self, queue_name: str, count: int) -> list[tuple[Item, Waiting]]:
        """The first ``count`` eligible PENDING items of the queue in dispatch order, with their place and
        why they wait, and the items being assigned (whose run token is minted). Read off the queue's heap
        best-first, so the cost is O(count log count) however deep the queue is; entries whose item moved
        on are passed over, as :meth:`_waiting_line` drops them. It ends before the first item past the
        backlog's key (an item its agent released), whose place the items left in the database decide."""
        heap = self._pending.get(queue_name, [])
        backlog = self._backlogs.get(queue_name)
        frontier = [(heap[0], 0)] if heap else []
        front: list[Item] = []
        seen = set()
        while frontier and len(front) < count:
            (rank, seq, item_id), index = heapq.heappop(frontier)
            if backlog is not None and (backlog.after is None or (rank, seq) > backlog.after):
                break  # and so are all that follow
            item = self.items.get(item_id)
            if item is not None and item.state is ItemState.PENDING and item_id not in seen:
                seen.add(item_id)
                front.append(item)
            for child in (2 * index + 1, 2 * index + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        now = self._clock()
        outlooks: dict[str, QueueOutlook] = {}
        found = [(item, self._why(item, place, outlooks, now)) for place, item in enumerate(front, 1)]
        minting = [self.items[item_id] for item_id, queue in self._minting.items() if queue == queue_name]
        waits = self.waiting(minting)
        return found + [(item, waits[item.id]) for item in minting if item.id in waits]

    def _why(self, item: Item, position: int, outlooks: dict[str, QueueOutlook], now: datetime) -> Waiting:
        """Why the item, PENDING in a queue that exists, waits; ``outlooks`` holds the queues' outlooks
        taken so far in this call, for the other items of the same queue."""
        outlook = outlooks.get(item.queue)
        if outlook is None:
            outlook = outlooks[item.queue] = self._outlook(self.queues[item.queue], now)
        return why_pending(
            item.life.eligible_time,
            position,
            outlook,
            now,
            assigning=self._assigning(item),
            token_refused=item.id in self._mint_failures,
        )

    def _assigning(self, item: Item) -> bool:
        """Whether a dispatch pass took the item: its run token is being minted, or its lease committed."""
        current = self.items.get(item.id)
        return item.id in self._minting or (current is not None and current.state.is_live)

    def _reason_now(
        self, item: Item, outlooks: dict[str, QueueOutlook], now: datetime
    ) -> PendingReason | None:
        """Why the item waits, if it is PENDING. Its place in line does not change the reason, so the
        queue's order is not taken for it."""
        if item.state is not ItemState.PENDING or item.queue not in self.queues:
            return None
        return self._why(item, 0, outlooks, now).reason

    def _tell_watchers_why(self) -> None:
        """Wake the watchers of PENDING items whose reason to wait changed since they were last woken for
        it (an agent connected or left, the queue was resumed, a slot came free): WatchItem sends the item
        again. Called after each dispatch pass, which every such change schedules, and when an agent
        leaves or drains."""
        now = self._clock()
        outlooks: dict[str, QueueOutlook] = {}
        for item_id in list(self._watchers):
            item = self.items.get(item_id)
            if item is None or (reason := self._reason_now(item, outlooks, now)) is None:
                continue
            if self._reasons_told.get(item_id) is not reason:
                self._reasons_told[item_id] = reason
                self._notify(item)
        for watchers in self._queue_watchers.values():
            for changes in watchers:
                changes.line_may_have_moved()

    def _waiting_line(self, queue_name: str) -> list[tuple[int, int]]:
        """The (priority rank, enqueue seq) of the queue's eligible PENDING items, in dispatch order: its
        heap's entries, less those whose item moved on. Taken again only after the heap or one of its items
        changed, so reads between two changes cost a binary search each."""
        line = self._lines.get(queue_name)
        if line is None:
            keys = {
                item_id: (rank, seq)
                for rank, seq, item_id in self._pending.get(queue_name, ())
                if (item := self.items.get(item_id)) is not None and item.state is ItemState.PENDING
            }
            line = self._lines[queue_name] = sorted(keys.values())
        return line

    def _outlook(self, queue: Queue, now: datetime) -> QueueOutlook:
        """What the queue's PENDING items wait for now, as a dispatch pass would find it."""
        serving = [agent for agent in self.agents.values() if agent.connected and queue.name in agent.queues]
        renewing = [agent for agent in serving if agent.lease_expiry is not None and agent.lease_expiry > now]
        return QueueOutlook(
            paused=queue.paused,
            live=self._live[queue.name],
            concurrency_limit=queue.concurrency_limit,
            agents=len(serving),
            free_slots=sum(agent.free_capacity for agent in renewing),
        )

    # ----- replicas: the index as a cache of the shared database (docs/design.md §5) ----------------

    async def refresh(self, item_ids: Iterable[str]) -> None:
        """Read these items as the database has them (another replica changed them, or a write of ours
        found it had) and put them where they belong in the index."""
        wanted = list(dict.fromkeys(item_ids))
        for start in range(0, len(wanted), _REFRESH_BATCH):
            batch = wanted[start : start + _REFRESH_BATCH]
            found = {item.id: item for item in await self._store.items(item_ids=batch)}
            closes = {(close.item_id, close.epoch): close for close in await self._store.run_closes_of(batch)}
            for item_id in batch:
                fresh = found.get(item_id)
                if fresh is None:
                    self._forget_deleted(item_id)
                else:
                    self.adopt(fresh, closes.get((item_id, fresh.life.epoch)))

    async def _refresh_agent(self, agent_id: str) -> list[str]:
        """The agent's leases as the database has them, and what this index thought it held: their items'
        ids."""
        held = await self._store.items(agent=f"agents/{agent_id}", states=LIVE_STATES)
        known = self.agents.get(agent_id)
        item_ids = [*(item.id for item in held), *(known.leases.values() if known else ())]
        await self.refresh(item_ids)
        return item_ids

    async def _settle(self, item_ids: list[str]) -> None:
        """Until these items are in the index as the database has them. ``adopt`` keeps the database's copy
        of an item out while a write of ours on it is on its way: each time a write ends, they are read
        again, until none is."""

        def unsettled() -> bool:
            return any(
                item_id in self._writing or item.life is not item.committed
                for item_id in item_ids
                if (item := self.items.get(item_id)) is not None
            )

        while unsettled():
            await self._writes_ended.wait()
            await self.refresh(item_ids)

    def _write_ended(self) -> None:
        self._writes_ended.set()
        self._writes_ended = asyncio.Event()

    def adopt(self, fresh: Item, close: RunClose | None) -> None:
        """Take the database's newer copy of an item into the index: leases that ended here are freed
        (their agent, if its stream is held here, is told to stop), new ones held, cancels passed on to the
        agent, PENDING items queued, ended ones dropped. ``close`` is the outbox row of its current
        attempt, when another replica ended that attempt."""
        current = self.items.get(fresh.id)
        if fresh.id in self._writing or fresh.id in self._admitting or fresh.queue not in self.queues:
            return  # a write of ours is on its way: its commit, or the refresh after it, decides
        if current is None:
            self._adopt_unindexed(fresh, close)
            return
        if current.life is not current.committed or not newer_revision(fresh.revision, current.revision):
            return  # a change of ours is about to be written: its commit, or the refresh after it, decides
        before, after = current.life, fresh.life
        was_closing = self._waits_for_close(current)
        current.life, current.committed, current.revision = after, after, fresh.revision
        current.update_time = fresh.update_time
        self._lines.pop(current.queue, None)
        same_lease = before.state.is_live and after.state.is_live and before.epoch == after.epoch
        if before.state.is_live and not same_lease:
            # Ended by its agent's Complete on another replica: a resend here is acknowledged alike.
            by_agent = after.completed_epoch == before.epoch != 0
            if not was_closing and not by_agent:
                lost = "the lease ended on another queue replica"
                revoke = Revoke(before.lease_id, current.name, RevokeReason.LEASE_LOST, lost)
                self._send_to_holder_of(before, revoke)
            if not was_closing:
                self._release_hold(current, before, ended_by_agent=by_agent)
            self._closing.pop(current.id, None)
            self._schedule_dispatch()
        if after.state.is_terminal:
            self.items.pop(current.id, None)
            self._forget_token(current)
        elif after.state is ItemState.PENDING:
            self._make_pending(current)
        elif not same_lease:
            self._ended_leases.pop(after.lease_id, None)
            self._hold(self._agent(after.agent.removeprefix("agents/")), current)
            self._watch_deadlines(current)
            self._end_if_undelivered(current, close)
        else:
            if after.state is ItemState.RUNNING and before.state is not ItemState.RUNNING:
                self._watch_deadlines(current)
            if after.cancel_requested and not before.cancel_requested and not was_closing:
                self._send_to_holder(current, Cancel(after.lease_id, current.name, after.message))
        self._closed_elsewhere(current, close)
        self._notify(current)

    def _adopt_unindexed(self, fresh: Item, close: RunClose | None) -> None:
        """:meth:`adopt` for an item the index does not hold: new to it, or gone from it."""
        life = fresh.life
        if life.state.is_live and self._ended_leases.get(life.lease_id, (None,))[0] == life.epoch:
            return  # read before its lease ended here (and it left the index): not held again
        if fresh.state.is_terminal and life.lease_id and life.lease_id not in self._ended_leases:
            # Seen here first ended (the changes came in one read): its agent may still resend its
            # Complete here after a failover, and is answered as where it was committed.
            by_agent = life.completed_epoch == life.epoch != 0
            self._ended_leases[life.lease_id] = (life.epoch, life.state, by_agent)
            if len(self._ended_leases) > _ENDED_LEASES_REMEMBERED:
                self._ended_leases.popitem(last=False)
        if not fresh.state.is_terminal:
            self._index(fresh)
            self._closed_elsewhere(fresh, close)
            if fresh.state.is_live:
                self._end_if_undelivered(fresh, close)
            self._notify(fresh)

    def _end_if_undelivered(self, item: Item, close: RunClose | None) -> None:
        """A lease another replica gave an agent whose stream is held here: that replica still believed it
        held the stream, and its Assignment went nowhere. The attempt ends as when an agent reconnects
        without a lease (the agent never had it, so nothing runs twice)."""
        if close is None and item.life.agent.removeprefix("agents/") in self._sessions:
            lost = "assigned through a queue replica the agent had left"
            self._spawn(
                self._record_closes([(item, self._close_attempt(item, FailureReason.AGENT_LOST, lost))])
            )

    def _closed_elsewhere(self, item: Item, close: RunClose | None) -> None:
        """Another replica ended the item's current attempt and waits for its run's close: the lease is
        over here too."""
        if close is None or not item.state.is_live or self._waits_for_close(item):
            return
        if self._leases.get(item.lease_id) == item.id:
            revoke = Revoke(item.lease_id, item.name, RevokeReason.LEASE_LOST, "the lease was ended")
            self._send_to_holder(item, revoke)
            self._release_hold(item, item.life, ended_by_agent=False)
        self._closing[item.id] = close
        self._schedule_dispatch()

    def _forget_deleted(self, item_id: str) -> None:
        """The item is gone from the database (its queue was deleted, or it ended and was pruned)."""
        self._unrest(item_id)
        item = self.items.pop(item_id, None)
        if item is None:
            return
        if self._leases.get(item.lease_id) == item.id:
            self._release_hold(item, item.life, ended_by_agent=False)
        self._closing.pop(item_id, None)
        self._lines.pop(item.queue, None)
        self._forget_token(item)

    async def resync(self) -> None:
        """Compare every item not yet ended with the database, and read again those that differ: what
        notifications missed (a replica's LISTEN connection drops them while it reconnects)."""
        revisions = await self._store.revisions()
        differ = [item_id for item_id, rev in revisions.items() if self._revision_of(item_id) != rev]
        gone = [item_id for item_id in self.items if item_id not in revisions]
        await self.refresh([*differ, *gone])

    def _revision_of(self, item_id: str) -> int | None:
        item = self.items.get(item_id)
        return item.revision if item is not None else None

    # ----- sessions ------------------------------------------------------------------------------

    async def connect(self, hello: Hello, *, key: str = "", any_agent: bool = True) -> Session:
        """Open a session for ``hello``'s agent, superseding an older one. Raises for unusable queues, and
        PERMISSION_DENIED when the agent holds leases taken under another key (``key``, the caller's)
        unless ``any_agent`` (an admin key): a key cannot pass for another agent to end its work."""
        known = self.agents.get(hello.agent_id)
        if known is not None and known.key and known.key != key and known.leases and not any_agent:
            raise PermissionDenied(
                "AGENT_KEY_MISMATCH",
                f"agents/{hello.agent_id} holds leases taken with another key; connect with that key",
                metadata={"resource": f"agents/{hello.agent_id}"},
            )
        await self._check_queues(hello)
        if (older := self._sessions.get(hello.agent_id)) is not None:
            # Before the refresh: a lease another replica gave the agent is not taken for one that went
            # to a stream of it here (_end_if_undelivered).
            older.close(superseded=True)
            self.disconnect(older)
        if self._replicated:
            # Its leases as the database has them: it may have held them through another replica.
            its_items = await self._refresh_agent(hello.agent_id)
            await self._renew_in_database(hello.agent_id, hello.session_id)
            # A claim of ours for another agent, read stale before another replica leased one of them to
            # this agent, keeps that lease out of the index until the claim is refused: the verdicts
            # wait, or a lease the agent holds would be called lost (and then ended as never delivered).
            await self._settle(its_items)
            for item_id in self._agent(hello.agent_id).leases.values():
                # Timed here from now on: a deadline that fell due elsewhere meanwhile was passed over.
                self._watch_deadlines(self.items[item_id])
        now = self._clock()
        agent = self._agent(hello.agent_id)
        agent.display_name = hello.display_name
        served_before = agent.queues
        agent.queues = list(dict.fromkeys(hello.queues))
        agent.resources = set(hello.resources)
        agent.capacity = hello.capacity
        agent.draining = hello.draining
        agent.version = hello.version
        agent.labels = dict(hello.labels)
        agent.session_id = hello.session_id
        agent.key = key
        agent.connected = True
        agent.connect_time = agent.last_heartbeat_time = now
        agent.disconnect_time = None
        agent.next_queue = 0
        self._renew(agent, now)

        verdicts, cancels, forgotten = [], [], []
        for lease_id, item_id in list(agent.leases.items()):
            if lease_id not in hello.held_leases:
                forgotten.append(self.items[item_id])
        for lease_id, epoch in hello.held_leases.items():
            item = self.items.get(self._leases.get(lease_id, ""))
            if item is not None and item.life.agent == agent.name and item.life.epoch == epoch:
                verdicts.append(LeaseVerdict(lease_id, item.name, kept=True))
                if item.life.cancel_requested:
                    cancels.append(Cancel(lease_id, item.name, item.life.message or "cancelled by user"))
            else:
                verdicts.append(
                    LeaseVerdict(
                        lease_id,
                        item.name if item else "",
                        kept=False,
                        reason=RevokeReason.LEASE_LOST,
                        message="the lease is no longer held by this agent at this epoch",
                    )
                )
        lost = "the agent reconnected without this lease"  # so it will never report on it
        closed = [(item, self._close_attempt(item, FailureReason.AGENT_LOST, lost)) for item in forgotten]
        session = Session(agent, hello.session_id)
        self._sessions[agent.agent_id] = session
        session.send(
            Welcome(
                agent.name, hello.session_id, self.timing.ttl, self.timing.heartbeat_interval, verdicts, now
            )
        )
        for cancel in cancels:
            session.send(cancel)
        self._agent_changed(agent, also_tell=served_before)
        await self._record_closes(closed)
        self._schedule_dispatch()
        return session

    async def _check_queues(self, hello: Hello) -> None:
        """NOT_FOUND for a queue that does not exist, FAILED_PRECONDITION for one the agent cannot run."""
        for queue_name in hello.queues:
            queue = self.queues.get(queue_name)
            if queue is None and self._replicated and (queue := await self._store.queue(queue_name)):
                self.put_queue(queue)  # made on another replica, whose notice has not come yet
            if queue is None:
                raise NotFound(
                    "QUEUE_NOT_FOUND", f"queue {queue_name} does not exist", metadata={"resource": queue_name}
                )
            if queue.resource not in hello.resources:
                raise FailedPrecondition(
                    "RESOURCE_KIND_UNSUPPORTED",
                    f"queue {queue_name} runs on {queue.resource.value}, which this agent has no runner for",
                    metadata={"resource": queue_name, "kind": queue.resource.value},
                )

    async def agent_connected_elsewhere(self, agent_id: str) -> None:
        """Another replica committed a Hello of the agent: a session of it held here is stale (it left this
        replica without its stream ending here, as it does a replica that went silent), and is closed as
        superseded, as a newer session on this replica would close it, unless it is the newest."""
        session = self._sessions.get(agent_id)
        newest = await self._store.agent_session(agent_id) if session is not None else None
        if session is not None and newest != session.session_id and self._sessions.get(agent_id) is session:
            session.close(superseded=True)
            self.disconnect(session)

    def disconnect(self, session: Session) -> None:
        """The stream ended; the agent's leases run on until they expire or it reconnects."""
        session.open = False
        agent = session.agent
        if self._sessions.get(agent.agent_id) is session:
            del self._sessions[agent.agent_id]
            agent.connected = False
            agent.disconnect_time = self._clock()
            self._agent_changed(agent)
            self._forget_if_gone(agent)
            self._tell_watchers_why()

    def _forget_if_gone(self, agent: Agent) -> None:
        """Forget an agent that left holding nothing: agents come and go under new ids (a pod, a Slurm
        job each), and the index must not grow with every one that ever connected. A Hello makes it again;
        until then GetAgent answers AGENT_NOT_FOUND and ListAgents, which shows a disconnected agent only
        with leases, is unchanged."""
        if (
            not agent.connected
            and not agent.leases
            and not agent.leases_committing
            and self.agents.get(agent.agent_id) is agent
        ):
            del self.agents[agent.agent_id]

    async def handle(self, session: Session, request: AgentRequest) -> None:
        """Apply one agent message; the answer (Ack or Reject) goes to the session once committed."""
        agent = session.agent
        now = self._clock()
        agent.last_heartbeat_time = now
        self._agent_changed(agent)
        match request:
            case Heartbeat(sequence):
                if self._replicated:
                    await self._renew_in_database(agent.agent_id)
                self._renew(agent, now)
                session.send(Ack(sequence, MessageKind.HEARTBEAT))
            case SetCapacity(sequence, capacity):
                agent.capacity = capacity
                session.send(Ack(sequence, MessageKind.SET_CAPACITY))
                self._schedule_dispatch()
            case Drain(sequence):
                agent.draining = True
                session.send(Ack(sequence, MessageKind.DRAIN))
                self._tell_watchers_why()
            case Progress() | Complete() | Release():
                await self._handle_lease_message(session, request, now)

    async def _handle_lease_message(
        self, session: Session, request: Progress | Complete | Release, now: datetime, tries: int = 1
    ) -> None:
        kind = {Progress: MessageKind.PROGRESS, Complete: MessageKind.COMPLETE, Release: MessageKind.RELEASE}[
            type(request)
        ]
        item = self.items.get(self._leases.get(request.lease_id, ""))
        if item is None or item.life.agent != session.agent.name:
            session.send(self._answer_unknown_lease(request, kind))
            return
        queue = self.queues[item.queue]
        try:
            match request:
                case Progress(_, _, epoch, state, detail):
                    life = lifecycle.progress(item.life, epoch, state, now, detail)
                case Complete(_, _, epoch, outcome, reason, exit_code, message):
                    life = lifecycle.complete(
                        item.life,
                        epoch,
                        outcome,
                        now,
                        queue.retry_policy,
                        reason=reason,
                        message=message,
                        exit_code=exit_code,
                    )
                case Release(_, _, epoch, message):
                    life = lifecycle.release(item.life, epoch, now, queue.retry_policy, message)
        except LeaseLost as error:
            session.send(
                Reject(request.sequence, kind, request.lease_id, RejectReason.LEASE_LOST, error.message)
            )
            return
        except FailedPrecondition as error:
            session.send(
                Reject(
                    request.sequence, kind, request.lease_id, RejectReason.INVALID_TRANSITION, error.message
                )
            )
            return
        self._move(item, life, ended_by_agent=isinstance(request, Complete))
        # The state as the message left it: a retried item may be leased again by the time of the Ack.
        try:
            await self._persist([item])
        except ItemChanged:
            if tries < _TRIES_AGAINST_REPLICAS:
                # Applied again to what another replica made of the item (a cancel requested, the lease ended)
                await self._handle_lease_message(session, request, self._clock(), tries + 1)
                return
            session.send(_not_committed(request, kind, f"{item.name} kept changing on other queue replicas"))
            return
        except Exception as error:
            # The store failed: _persist put the item back as committed, so the same message sent again
            # applies once (one that did commit after all, its connection lost in COMMIT, is answered as
            # ended by then). The stream and every other message on it go on.
            logger.warning("could not commit the %s of %s: %r", kind.name, item.name, error)
            session.send(_not_committed(request, kind, "the queue's database failed"))
            return
        session.send(Ack(request.sequence, kind, request.lease_id, life.state))

    def _answer_unknown_lease(
        self, request: Progress | Complete | Release, kind: MessageKind
    ) -> Ack | Reject:
        if request.lease_id in self._closes_committing:
            # Not lost yet: the close may fail, or find that the agent renewed its leases meanwhile, and
            # give the lease back. The agent sends the message again; by then the close has decided.
            return _not_committed(request, kind, "the queue is ending this lease")
        ended = self._ended_leases.get(request.lease_id)
        if ended is None:
            return Reject(
                request.sequence, kind, request.lease_id, RejectReason.LEASE_NOT_FOUND, "no such lease"
            )
        epoch, state, by_agent = ended
        if isinstance(request, Complete) and by_agent and request.epoch == epoch:
            return Ack(request.sequence, kind, request.lease_id, state)  # a resent Complete
        return Reject(
            request.sequence,
            kind,
            request.lease_id,
            RejectReason.LEASE_LOST,
            "the lease has ended; stop the work",
        )

    # ----- dispatch ------------------------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        assignments = []
        failed_queues: set[str] = set()
        now = self._clock()
        for agent in list(self.agents.values()):
            if not self._may_receive(agent, now):
                continue
            while agent.free_capacity > 0 and (item := self._next_item_for(agent, failed_queues)):
                if not self._has_token(item) and not self._signed_at_once(item):
                    self._mint_for(item, agent)
                    continue
                assignment = self._assign(item, agent)
                if assignment is not None:
                    assignments.append((item, assignment))
        if assignments:
            self._spawn(self._deliver(assignments))
        self._tell_watchers_why()

    def _may_receive(self, agent: Agent, now: datetime) -> bool:
        """Whether new work may go to the agent: it renews its leases (it stopped renewing: no new work
        until it heartbeats again), and, among replicas, its stream is held here."""
        renewing = agent.lease_expiry is not None and agent.lease_expiry > now
        return renewing and (not self._replicated or agent.agent_id in self._sessions)

    def _next_item_for(self, agent: Agent, failed_queues: set[str]) -> Item | None:
        """Round-robin over the agent's queues, starting after the one that served it last; a queue
        that fails is skipped for the rest of the pass."""
        count = len(agent.queues)
        for offset in range(count):
            position = (agent.next_queue + offset) % count
            queue_name = agent.queues[position]
            if queue_name in failed_queues:
                continue
            try:
                item = self._pop_eligible(queue_name)
            except Exception:
                logger.exception("dispatch skipped queue %s, which failed", queue_name)
                failed_queues.add(queue_name)
                continue
            if item is not None:
                agent.next_queue = (position + 1) % count
                return item
        return None

    def _may_assign_from(self, queue: Queue) -> bool:
        return not queue.paused and not (
            queue.concurrency_limit and self._live[queue.name] >= queue.concurrency_limit
        )

    def _has_waiting(self, queue: Queue) -> bool:
        """Whether an eligible PENDING item is in the queue's index (dropping entries that moved on) and
        goes next: no item left in the database sorts before it. When one may, the next page is read, and
        the dispatch pass after it takes the item."""
        heap = self._pending[queue.name]
        while heap and not (
            (item := self.items.get(heap[0][2])) is not None and item.state is ItemState.PENDING
        ):
            heapq.heappop(heap)
        backlog = self._backlogs.get(queue.name)
        if backlog is not None and (not heap or backlog.after is None or heap[0][:2] > backlog.after):
            self._page_in(queue, backlog)
            return False
        due = self._resting.due.get(queue.name)
        if heap and due and min(due.values()) < heap[0][:2]:
            return False  # an item whose retry's wait ended goes first: the pass after its read takes it
        if heap and self._has_token(self.items[heap[0][2]]) and self._minting_before(queue.name, heap[0][:2]):
            # Tokens are minted side by side and may come back out of turn: a minted item is leased only
            # once every older item of its queue taken for minting has its token (or has failed to get one).
            return False
        return bool(heap)

    def _minting_before(self, queue_name: str, key: LineKey) -> bool:
        """Whether an item of the queue that sorts before ``key`` is having its run token minted."""
        return any(
            minting == queue_name and (item := self.items.get(item_id)) is not None and self._key(item) < key
            for item_id, minting in self._minting.items()
        )

    def _offers_work(self, queue_name: str) -> bool:
        """Whether a dispatch pass may take an item from the queue now."""
        queue = self.queues.get(queue_name)
        return queue is not None and self._may_assign_from(queue) and self._has_waiting(queue)

    def _pop_eligible(self, queue_name: str) -> Item | None:
        if not self._offers_work(queue_name):
            return None
        self._lines.pop(queue_name, None)
        heap = self._pending[queue_name]
        item = self.items[heapq.heappop(heap)[2]]
        backlog = self._backlogs.get(queue_name)
        if backlog is not None and self._window is not None and len(heap) < self._window // 2:
            self._page_in(self.queues[queue_name], backlog)  # read ahead, before the line runs dry
        return item

    # ----- PENDING items left in the database (docs/design.md §9 "The queue's in-memory index") ------

    def _key(self, item: Item) -> LineKey:
        return self._rank(item), item.seq

    def _past_after(self, item: Item) -> bool:
        """Whether the item is PENDING in a queue with a backlog and sorts after its ``after``."""
        backlog = self._backlogs.get(item.queue)
        return (
            backlog is not None
            and item.state is ItemState.PENDING
            and (backlog.after is None or self._key(item) > backlog.after)
        )

    def _in_backlog(self, item: Item) -> bool:
        """Whether the item (read from the store, or new) belongs among the items its queue left in the
        database."""
        return self._past_after(item) and item.id not in self.items and item.id not in self._resting.by_id

    def _left_in_database(self, item: Item) -> None:
        backlog = self._backlogs[item.queue]
        backlog.count += 1
        key = self._key(item)
        if not self.queues[item.queue].prioritization or (backlog.last is not None and key > backlog.last):
            backlog.last = key  # a FIFO queue's new item is its last; a prioritized queue's, if it sorts so
        if backlog.arrivals is not None:
            backlog.arrivals.append(item)

    def _back_to_database(self, item: Item) -> None:
        """A write of an item left in the database failed, and rolling it back put it in the index: it
        stays where it was, in the database, counted there (a page's own copy of it stays held)."""
        if self.items.get(item.id) is item:
            del self.items[item.id]
            self._lines.pop(item.queue, None)

    async def _taken_from_database(self, item: Item) -> None:
        """An item left in the database was cancelled there."""
        backlog = self._backlogs.get(item.queue)
        if item.id in self._resting.by_id:
            self._unrest(item.id)
        elif backlog is not None:
            backlog.count = max(backlog.count - 1, 0)
        if backlog is not None and backlog.arrivals is not None:
            backlog.arrivals = [arrival for arrival in backlog.arrivals if arrival.id != item.id]
            backlog.gone.add(item.id)
        if item.id in self.items:
            await self.refresh([item.id])  # a page read before the cancel took it in

    def _page_in(self, queue: Queue, backlog: _Backlog) -> None:
        if backlog.arrivals is None:
            backlog.arrivals = []
            self._spawn(self._read_page(queue, backlog))

    async def _read_page(self, queue: Queue, backlog: _Backlog) -> None:
        """Take the queue's next PENDING items into the index, and the items enqueued meanwhile that sort
        among them. A read that fails is tried again a heartbeat interval later."""
        assert self._window is not None
        try:
            page, reached = await self._store.pending_page(queue, backlog.after, self._window)
        except Exception:
            logger.exception("queue %s failed to read its next PENDING items; trying again", queue.name)
            backlog.arrivals = None
            backlog.gone.clear()
            self._deadlines.at(self._clock() + self.timing.heartbeat_interval, "page", queue.name)
            return
        arrivals, backlog.arrivals = backlog.arrivals or [], None
        gone, backlog.gone = backlog.gone, set()
        if self._backlogs.get(queue.name) is not backlog:
            return  # the queue was deleted, or its order changed (read again from its start)
        now, rested = self._clock(), 0
        taken = {}
        for item in page:
            known = item.id in self.items or item.id in self._resting.by_id
            if known or item.id in self._writing or item.id in self._admitting or item.id in gone:
                continue
            if self._rests(item, now):
                self._rest(item, timed=False)  # its id and due time only: a page of them holds nothing
                rested += 1
            else:
                taken[item.id] = item
        if reached is None:
            del self._backlogs[queue.name]  # the page read to the line's end
        else:
            backlog.after = reached
        for arrival in arrivals:
            if (reached is None or self._key(arrival) <= reached) and arrival.id not in self._writing:
                taken.setdefault(arrival.id, arrival)
        backlog.count = max(backlog.count - len(taken) - rested, 0)
        for item in taken.values():
            self._index(item)
        self._schedule_dispatch()

    # ----- PENDING items waiting out a retry's delay, left in the database ------------------------------

    def _take_in(self, item: Item) -> None:
        """Index an item read from the store; one waiting out a retry's delay is left in the database."""
        if self._rests(item, self._clock()):
            self._rest(item, timed=False)
        else:
            self._index(item)

    def _rests(self, item: Item, now: datetime) -> bool:
        """Whether the item, PENDING and waiting out a retry's delay past :data:`READ_BACK_LEAD`, may wait
        in the database: the index is bounded, nothing of the item lives only in memory, and nobody watches
        it (WatchItem is told when its pending reason changes, which only an item in the index is followed
        for)."""
        return (
            self._window is not None
            and item.state is ItemState.PENDING
            and item.life.eligible_time > now + READ_BACK_LEAD
            and item.id not in self._watchers
            and self._at_rest(item)
        )

    def _rest(self, item: Item, *, timed: bool) -> None:
        """Leave the item in the database until its retry's wait ends, keeping its key and its due time
        (``timed``: already on the timer), so that however many items wait out a retry, the index holds
        none of them; it is read back :data:`READ_BACK_LEAD` before it is due."""
        if self.items.get(item.id) is item:
            del self.items[item.id]
            self._lines.pop(item.queue, None)
        minted, _ = self._run_tokens.get(item.id, ("", ""))
        if minted and minted == item.life.run:
            del self._run_tokens[item.id]  # the ended attempt's: revoked with its end
        life = item.life
        self._resting.by_id[item.id] = _Resting(item.queue, int(item.priority), item.seq, life.epoch)
        if not timed:
            self._deadlines.at(life.eligible_time, "eligible", item.id, life.epoch)
        self._deadlines.at(life.eligible_time - READ_BACK_LEAD, "read_back", item.id, life.epoch)

    def _resting_key(self, rest: _Resting) -> LineKey:
        queue = self.queues.get(rest.queue)
        return (rest.priority if queue is not None and queue.prioritization else 0), rest.seq

    def _unrest(self, item_id: str) -> None:
        """The item no longer waits in the database as a resting item (it is due, ended or gone)."""
        rest = self._resting.by_id.pop(item_id, None)
        if rest is None:
            return
        self._resting.read.pop(item_id, None)
        due = self._resting.due.get(rest.queue)
        if due is not None and due.pop(item_id, None) is not None:
            if not due:
                del self._resting.due[rest.queue]
            self._schedule_dispatch()  # the items behind it may go now

    def _read_ahead(self, item_id: str, epoch: int) -> None:
        """Read a resting item back shortly before its wait ends, so that it is at hand when it does."""
        rest = self._resting.by_id.get(item_id)
        if rest is None or rest.epoch != epoch or item_id in self._resting.read:
            return
        if item_id not in self._resting.reading:
            self._resting.reading.add(item_id)
            self._resting.to_read.append(item_id)
            if len(self._resting.to_read) == 1:
                asyncio.get_running_loop().call_soon(self._read_due)

    def _come_due(self, item_id: str, epoch: int) -> None:
        """A resting item's retry wait ended. One that sorts past the backlog's ``after`` is counted among
        the items left in the database, which a page reads when the line reaches it; another enters its
        queue's heap as read back. Until its read lands (a slow or failed read, a cancel being written),
        no item that sorts after it is dispatched."""
        rest = self._resting.by_id.get(item_id)
        if rest is None or rest.epoch != epoch:
            return
        key = self._resting_key(rest)
        backlog = self._backlogs.get(rest.queue)
        if backlog is not None and (backlog.after is None or key > backlog.after):
            self._unrest(item_id)
            self._count_in_backlog(backlog, key)
            self._schedule_dispatch()
            return
        read = self._resting.read.get(item_id)
        if read is not None and item_id not in self._writing:
            self._unrest(item_id)
            self._held_again(read)
            return
        self._resting.due.setdefault(rest.queue, {})[item_id] = key
        self._resting.read.pop(item_id, None)  # read before a cancel now being written: read again
        self._read_ahead(item_id, epoch)

    @staticmethod
    def _count_in_backlog(backlog: _Backlog, key: LineKey) -> None:
        """An item already in the database joins the backlog's count (a page in flight reads it, if it
        reaches it: the item was PENDING there all along)."""
        backlog.count += 1
        if backlog.last is not None and key > backlog.last:
            backlog.last = key

    def _follow_watched(self, item: Item) -> None:
        """A resting item someone began to watch, read back: in the index until its wait ends (the timer
        that ends it is set), so that its watchers are told when its reason to wait changes (review R2).
        Its reason now is the one the watch began with."""
        self._unrest(item.id)
        self.items[item.id] = item
        self._lines.pop(item.queue, None)
        self._reasons_told.setdefault(item.id, self._reason_now(item, {}, self._clock()))

    def _held_again(self, item: Item) -> None:
        """A resting item read back, due: in its queue's heap, the line trimmed if it grew past its bound."""
        self._index(item)
        if self._window is not None and len(self._pending[item.queue]) > 2 * self._window:
            self._trim(item.queue, self._window)

    def _read_due(self) -> None:
        due, self._resting.to_read = self._resting.to_read, []
        self._spawn(self._read_back(due))

    async def _read_back(self, item_ids: list[str]) -> None:
        """Read resting items back as the database has them: kept until due, or taken in if due already."""
        try:
            found = {}
            for start in range(0, len(item_ids), _REFRESH_BATCH):
                batch = item_ids[start : start + _REFRESH_BATCH]
                found.update({item.id: item for item in await self._store.items(item_ids=batch)})
        except Exception:
            logger.exception("%d items waiting out a retry were not read back; trying again", len(item_ids))
            found = None
        now = self._clock()
        for item_id in item_ids:
            self._resting.reading.discard(item_id)
            rest = self._resting.by_id.get(item_id)
            if rest is None:
                continue  # cancelled, or its queue deleted, meanwhile
            if found is None or item_id in self._writing:  # a cancel being written decides first
                self._deadlines.at(now + self.timing.heartbeat_interval, "read_back", item_id, rest.epoch)
                continue
            fresh = found.get(item_id)
            if fresh is None or fresh.state is not ItemState.PENDING or fresh.id in self.items:
                self._unrest(item_id)  # ended meanwhile (a cancel's commit that has not returned yet)
                continue
            if item_id not in self._resting.due.get(rest.queue, {}):
                backlog = self._backlogs.get(fresh.queue)
                if item_id in self._watchers and not (backlog is not None and self._past_after(fresh)):
                    self._follow_watched(fresh)
                else:
                    self._resting.read[item_id] = fresh  # taken in when due
                continue
            self._unrest(item_id)
            backlog = self._backlogs.get(fresh.queue)
            if backlog is not None and self._past_after(fresh):
                self._count_in_backlog(backlog, self._key(fresh))  # a trim moved the backlog's key back
            else:
                self._held_again(fresh)
        self._schedule_dispatch()

    def _assign(self, item: Item, agent: Agent) -> Assignment | None:
        """Lease the item to the agent in memory; the claim is committed before the Assignment is sent.

        An item that cannot be assigned stays PENDING (as the store has it) and is set aside until its
        queue changes, so that it cannot fail every pass."""
        try:
            life = self._leased(item, agent)
        except Exception:
            logger.exception(
                "dispatch set aside item %s, which failed to assign; it stays PENDING", item.name
            )
            self._set_aside[item.queue].add(item.id)
            return None
        self._move(item, life)
        return self._assignment(item)

    def _leased(self, item: Item, agent: Agent) -> ItemLife:
        """The item's life leased to the agent: its next attempt, under a new epoch and lease."""
        return lifecycle.assign(
            item.life,
            agent.name,
            self._clock(),
            lease_id=random_hex(32),
            run=item.run_name(item.life.attempt + 1),
            start_timeout=self.queues[item.queue].start_timeout or None,
        )

    def _assignment(self, item: Item) -> Assignment:
        """The Assignment of the item's current lease, with the item as it is now, its run token and the
        secrets it is given."""
        life = item.life
        assert life.assign_time is not None, "only a leased item is assigned"
        queue = self.queues[item.queue]
        run, token = self._run_tokens.get(item.id, ("", ""))
        return Assignment(
            _snapshot(item),
            queue,
            life.lease_id,
            life.epoch,
            life.attempt,
            life.run,
            life.assign_time,
            life.start_deadline,
            run_token=token if run == life.run else "",
            secrets=merged_mounts(queue.secrets, item.secrets),
        )

    # ----- run tokens (docs/design.md §13) --------------------------------------------------------

    def _has_token(self, item: Item) -> bool:
        """Whether the item's next attempt has its run token (always, without a token minter)."""
        if self._tokens is None:
            return True
        run, _ = self._run_tokens.get(item.id, ("", ""))
        return run == item.run_name(item.life.attempt + 1)

    def _signed_at_once(self, item: Item) -> bool:
        """Give the item's next attempt a token made with no call (signed by this queue, docs/design.md §13),
        when there is one and no older item of its queue is still waiting for its mint (leases go out in
        line). The pass then leases the item at once."""
        assert self._tokens is not None
        if self._minting_before(item.queue, self._key(item)):
            return False
        run = item.run_name(item.life.attempt + 1)
        token = self._tokens.signed_run_token(run, item.name, item.job_version, self._secret_names(item))
        if token is None:
            return False
        self._mint_failures.pop(item.id, None)
        self._run_tokens[item.id] = (run, token)
        return True

    def _secret_names(self, item: Item) -> list[str]:
        """The secrets the item's attempts may read: its queue's mounts and its own."""
        queue = self.queues.get(item.queue)
        return sorted({mount.secret for mount in merged_mounts(queue.secrets if queue else (), item.secrets)})

    def _mint_for(self, item: Item, agent: Agent) -> None:
        """Mint the run token of the item's next attempt before it is leased. The agent's room and the
        queue's slot are held meanwhile (so that the pass does not give them twice); once minted, the
        item waits at the head of its queue again and the next pass leases it with the token. A registry
        that does not answer costs the item time only: it stays PENDING (as the store has it) and is
        tried again after a back-off. Other items are dispatched meanwhile."""
        agent.leases_committing += 1
        self._live[item.queue] += 1
        self._minting[item.id] = item.queue
        self._spawn(self._mint(item, agent))

    async def _mint(self, item: Item, agent: Agent) -> None:
        run = item.run_name(item.life.attempt + 1)
        try:
            with tracing.pending(item):
                token: str | None = await self._minted(item, run)
        finally:
            agent.leases_committing -= 1
            self._live[item.queue] -= 1
            self._minting.pop(item.id, None)
            self._forget_if_gone(agent)  # it may have left meanwhile
            self._schedule_dispatch()  # the room held is free again
        current = self.items.get(item.id)
        if current is not item or item.state is not ItemState.PENDING:
            if token is not None:
                await self._revoke_unused(run)  # the item ended (cancelled, its queue deleted) meanwhile
            return
        if token is None:
            self._mint_failures[item.id] += 1
            # The outbox's back-off: jittered, at most 10 s, so a registry back from an outage mints for
            # every waiting item within about that much, spread out.
            retry_at = self._clock() + backoff(self._mint_failures[item.id], self._rng)
            self._deadlines.at(retry_at, "eligible", item.id, item.life.epoch)
            return
        self._mint_failures.pop(item.id, None)
        self._run_tokens[item.id] = (run, token)
        self._queue_up(item)

    async def _minted(self, item: Item, run: str) -> str | None:
        """The token for ``run``, or None when the registry did not give one in time."""
        assert self._tokens is not None
        secrets = self._secret_names(item)
        if (token := self._tokens.signed_run_token(run, item.name, item.job_version, secrets)) is not None:
            return token
        try:
            async with asyncio.timeout(MINT_TIMEOUT_SECONDS):
                return await self._tokens.mint_run_token(run, item.name, item.job_version, secrets)
        except (TokenCallFailed, TimeoutError) as error:
            why = str(error) or "timed out"
            logger.warning("no run token for %s yet (%s); it stays PENDING", item.name, why)
            return None
        except Exception:  # whatever went wrong, the item must not be lost from dispatch
            logger.exception("minting the run token of %s failed; it stays PENDING", item.name)
            return None

    async def issue_token(self, item: Item, leased: Assignment | None) -> Assignment | None:
        """Enqueue's one-commit path: the run token of a new item :meth:`admit` leased, minted before its
        insert. Without one in time the item is not leased after all: it is inserted PENDING, and
        dispatched once a token is minted."""
        if leased is None or self._tokens is None:
            return leased
        token = await self._minted(item, leased.run)
        if token is not None:
            self._run_tokens[item.id] = (leased.run, token)
            return replace(leased, run_token=token)
        agent = self.agents[item.life.agent.removeprefix("agents/")]
        agent.leases_committing -= 1
        self._live[item.queue] -= 1
        self._arriving[item.queue] += 1
        self._forget_if_gone(agent)  # it may have left meanwhile
        # As it was before admit leased it: a new item's life is its Enqueue transition alone.
        enqueued = lifecycle.enqueued(item.id, item.life.max_attempts, item.life.enqueue_time)
        item.life = replace(enqueued, history=item.life.history[:1])
        self._schedule_dispatch()
        return None

    def _forget_token(self, item: Item) -> None:
        """The item ended: a token minted for an attempt that never came is revoked."""
        self._mint_failures.pop(item.id, None)
        minted = self._run_tokens.pop(item.id, None)
        if minted is not None and minted[0] != item.life.run:
            self._spawn(self._revoke_unused(minted[0]))

    async def _revoke_unused(self, run: str) -> None:
        now = self._clock()

        async def write(tx: QueueWrite) -> None:
            tx.insert_token_revocations([run], now)

        await self._store.write(write)

    def wake_drainers(self) -> None:
        """Look at both outboxes now: another replica may have put rows in them (or died holding some)."""
        self.run_closer.wake()
        if self.token_revoker is not None:
            self.token_revoker.wake()

    async def _deliver(self, assignments: list[tuple[Item, Assignment]]) -> None:
        claimed = [item for item, _ in assignments]
        limits = {}
        if self._replicated:
            for item in claimed:
                if (queue := self.queues.get(item.queue)) is not None and (limit := queue.concurrency_limit):
                    limits[item.queue] = limit
        try:
            await self._persist(claimed, limits=limits)
        except ItemChanged as changed:  # claimed by another replica first, or its queue is at its limit
            for item in claimed:
                if item.id in changed.item_ids:
                    self.metrics.claims_refused[item.queue].inc()
            for limited in {item.queue for item in claimed if item.id in changed.item_ids} & set(limits):
                # The live items the other replicas hold, so that this one counts them too.
                live = await self._store.items(queue=limited, states=LIVE_STATES)
                await self.refresh(item.id for item in live)
        for item, assignment in assignments:
            # Still the agent's? (a cancel or a deadline may have moved it on during the commit)
            if item.lease_id == assignment.lease_id and item.state.is_live:
                self._send_to_holder(item, assignment)
                self._assigned(item)

    def _assigned(self, item: Item) -> None:
        waited = self._clock() - item.life.eligible_time
        self.metrics.dispatch[item.queue].observe(waited.total_seconds())
        self.metrics.assignments[item.queue].inc()

    # ----- what the metrics read when scraped -----------------------------------------------------

    def depths(self) -> tuple[dict[str, int], dict[str, int]]:
        """Items PENDING, and items held under a lease, per queue (every queue, 0 included)."""
        pending, live = dict.fromkeys(self.queues, 0), dict.fromkeys(self.queues, 0)
        for item in self.items.values():
            if item.state is ItemState.PENDING:
                pending[item.queue] = pending.get(item.queue, 0) + 1
            elif item.state.is_live:
                live[item.queue] = live.get(item.queue, 0) + 1
        for name, backlog in self._backlogs.items():
            pending[name] = pending.get(name, 0) + backlog.count
        for rest in self._resting.by_id.values():
            pending[rest.queue] = pending.get(rest.queue, 0) + 1
        return pending, live

    def leases_by_queue(self) -> dict[str, int]:
        held = dict.fromkeys(self.queues, 0)
        for item_id in self._leases.values():
            if (item := self.items.get(item_id)) is not None:
                held[item.queue] = held.get(item.queue, 0) + 1
        return held

    # ----- leases, deadlines and endings --------------------------------------------------------

    def _agent(self, agent_id: str) -> Agent:
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = Agent(agent_id=agent_id)
        return agent

    def _renew(self, agent: Agent, now: datetime) -> None:
        lapsed = agent.lease_expiry is None or agent.lease_expiry <= now
        agent.lease_expiry = now + self.timing.ttl
        if not self._replicated:  # replicas: the database's clock decides (expire_agent)
            self._deadlines.at(agent.lease_expiry, "expiry", agent.agent_id)
        if lapsed:
            self._schedule_dispatch()

    async def _renew_in_database(self, agent_id: str, session_id: str = "") -> None:
        await self._store.renew_agent_lease(agent_id, self.timing.ttl, session_id)

    def _index(self, item: Item) -> None:
        """Put an item where its life says it belongs: waiting, held by its agent, or gone (ended)."""
        if item.state.is_terminal:
            self.items.pop(item.id, None)
            self._forget_token(item)
            return
        self.items[item.id] = item
        if item.state is ItemState.PENDING:
            self._make_pending(item)
        else:
            self._ended_leases.pop(item.lease_id, None)
            self._hold(self._agent(item.life.agent.removeprefix("agents/")), item)
            self._watch_deadlines(item)

    def _move(self, item: Item, life: ItemLife, *, ended_by_agent: bool = False) -> None:
        """Give the item its new life and follow it in the index: a new lease is held, an ended one freed,
        a retried item waits again, an ended one leaves."""
        before = item.life
        item.life = life
        if ItemState.PENDING in (before.state, life.state):
            self._lines.pop(item.queue, None)  # it left its queue's heap, or may be back in it
        if before.state.is_live and not (life.state.is_live and life.epoch == before.epoch):
            self._release_hold(item, before, ended_by_agent=ended_by_agent)
            if life.state is ItemState.PENDING:
                self._make_pending(item)
            self._schedule_dispatch()
        if life.state.is_terminal:
            self.items.pop(item.id, None)
            self._forget_token(item)
        elif life.state.is_live and before.state is ItemState.PENDING:
            self._hold(self._agent(life.agent.removeprefix("agents/")), item)
            self._watch_deadlines(item)
        elif life.state is ItemState.RUNNING and before.state is not ItemState.RUNNING:
            self._watch_deadlines(item)

    def _roll_back(self, item: Item, *, retry: bool = True, wait: timedelta | None = None) -> None:
        """A write of the item failed: back to the life the store has, and to its place for that life.

        What the write was for is tried again a heartbeat interval later, not at once: a store that
        fails is not hammered; the end of an attempt waiting for its run's close, when the outbox row's
        claim runs out. Not when another replica changed the item first (``retry`` False): what it
        changed is read next, and decides; a PENDING item is in line again at once, or after ``wait``."""
        committed = item.committed
        assert committed is not None, "only committed items are in the index"
        self._writing.pop(item.id, None)
        self._lines.pop(item.queue, None)  # a PENDING life may bring back its entry in the heap
        if self._leases.get(item.lease_id) == item.id:
            self._release_hold(item, item.life, ended_by_agent=False)
            del self._ended_leases[item.lease_id]
        item.life = committed
        if self._waits_for_close(item):
            self.items[item.id] = item
            return
        retry_at = self._clock() + self.timing.heartbeat_interval
        if committed.state is ItemState.PENDING:
            self.items[item.id] = item
            if retry:
                self._deadlines.at(retry_at, "eligible", item.id, committed.epoch)
            elif wait is not None:
                self._deadlines.at(self._clock() + wait, "eligible", item.id, committed.epoch)
            else:
                self._make_pending(item)  # in line again; the refresh that follows may take it out
            return
        self._index(item)
        if committed.state.is_live and retry:
            self._deadlines.at(retry_at, "expiry", committed.agent.removeprefix("agents/"))

    def _hold(self, agent: Agent, item: Item) -> None:
        if agent.lease_expiry is None and not agent.connected and not self._replicated:
            # Known only by a lease it holds (at a start, or made again after it was forgotten when the
            # write that ended its last lease failed): one TTL to come back, then its leases expire.
            # Replicas: the database's expiry decides (expire_agent).
            agent.lease_expiry = self._clock() + self.timing.ttl
            self._deadlines.at(agent.lease_expiry, "expiry", agent.agent_id)
        agent.leases[item.lease_id] = item.id
        self._leases[item.lease_id] = item.id
        self._live[item.queue] += 1
        self._agent_changed(agent)

    def _release_hold(self, item: Item, held: ItemLife, *, ended_by_agent: bool) -> None:
        """Free the lease ``held`` (the item's life while it held it)."""
        agent = self.agents.get(held.agent.removeprefix("agents/"))
        if agent is not None:
            agent.leases.pop(held.lease_id, None)
            self._agent_changed(agent)
            self._forget_if_gone(agent)
        if self._leases.pop(held.lease_id, None) is not None:
            self._live[item.queue] -= 1
        self._ended_leases[held.lease_id] = (held.epoch, item.state, ended_by_agent)
        if len(self._ended_leases) > _ENDED_LEASES_REMEMBERED:
            self._ended_leases.popitem(last=False)

    def _watch_deadlines(self, item: Item) -> None:
        life = item.life
        if life.state is ItemState.RUNNING:
            if item.max_run_time is not None and life.running_since is not None:
                end = lifecycle.later(life.running_since, item.max_run_time)
                self._deadlines.at(end, "max_run", item.id, life.epoch)
        elif life.start_deadline is not None:
            self._deadlines.at(life.start_deadline, "start", item.id, life.epoch)

    def _on_deadline(self, kind: str, key: str, epoch: int) -> None:
        now = self._clock()
        if kind == "page":
            self._schedule_dispatch()  # which reads the page again, if the queue still needs it
            return
        if kind == "expiry":
            agent = self.agents.get(key)
            if self._replicated or agent is None or agent.lease_expiry is None or agent.lease_expiry > now:
                return
            self._spawn(self._expire(agent, retry=("expiry", key)))
            return
        if kind == "read_back":
            self._read_ahead(key, epoch)
            return
        due = self.items.get(key)
        if due is None and kind == "eligible":
            self._come_due(key, epoch)
            return
        if due is None or due.life.epoch != epoch or self._waits_for_close(due):
            return
        if (
            kind != "eligible"
            and self._replicated
            and due.life.agent.removeprefix("agents/") not in self._sessions
        ):
            return  # the replica holding its agent's stream times it; its expiry, whoever sweeps
        self._on_item_deadline(kind, due)

    def _expire(self, agent: Agent, retry: tuple[str, str] | None = None) -> Coroutine[Any, Any, None]:
        """End every lease of an agent that stopped renewing them, at once; what it returns commits that
        (among replicas, only if the database still has them expired when it does)."""
        lost = f"{agent.name} stopped renewing its lease"
        logger.info("%s: ending its %d leases", lost, len(agent.leases))
        closed, revokes = [], []
        for item in [self.items[item_id] for item_id in agent.leases.values()]:
            self.metrics.expired[item.queue].inc()
            revokes.append((item, Revoke(item.lease_id, item.name, RevokeReason.EXPIRED, "lease expired")))
            closed.append((item, self._close_attempt(item, FailureReason.AGENT_LOST, lost)))
        expired = agent.agent_id if self._replicated else None
        return self._record_closes(closed, then_send=revokes, retry=retry, expired_agent=expired)

    async def expire_agent(self, agent_id: str) -> None:
        """Replicas: the agent's leases expired by the database's clock (its heartbeats renew them on
        whichever replica holds its stream). Any replica's sweeper may end them: each close is a
        conditional write, so two sweepers end an attempt once."""
        await self._refresh_agent(agent_id)
        agent = self.agents.get(agent_id)  # None: it left holding nothing, and was forgotten here
        if agent is not None and agent.lease_expiry is not None:
            agent.lease_expiry = min(agent.lease_expiry, self._clock())  # no new work until it renews
        if agent is not None and agent.leases:
            await self._expire(agent)
            return

        async def forget(tx: QueueWrite) -> None:
            await tx.forget_agent_lease(agent_id)

        await self._store.write(forget)
        if agent is not None:
            self._forget_if_gone(agent)

    def _on_item_deadline(self, kind: str, item: Item) -> None:
        if kind == "eligible" and item.state is ItemState.PENDING:
            # Not before its time (a deadline set a heartbeat later, when a failed write rolled back, may
            # come before the end of a retry's wait): the timer is set again for then, never dropped.
            self._make_pending(item)
        elif kind == "start" and item.state in (ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING):
            self._take_away(
                item, RevokeReason.START_TIMEOUT, FailureReason.START_TIMEOUT, "not running in time"
            )
        elif kind == "max_run" and item.state is ItemState.RUNNING:
            self._take_away(
                item, RevokeReason.MAX_RUN_TIME_EXCEEDED, FailureReason.MAX_RUN_TIME_EXCEEDED, "ran too long"
            )

    def _take_away(self, item: Item, revoke: RevokeReason, failure: FailureReason, message: str) -> None:
        notice = Revoke(item.lease_id, item.name, revoke, message)
        close = self._close_attempt(item, failure, message)
        deadline = "start" if failure is FailureReason.START_TIMEOUT else "max_run"
        self._spawn(
            self._record_closes([(item, close)], then_send=[(item, notice)], retry=(deadline, item.id))
        )

    # ----- attempts the queue ends, and their runs (docs/design.md §16) ---------------------------

    def _close_attempt(self, item: Item, reason: FailureReason, message: str) -> RunClose:
        """End the item's live attempt without its agent. The lease is over at once (the agent's messages
        about it are NOT_COMMITTED until the close is committed, LEASE_LOST from then on), while the item
        waits, out of dispatch, for the registry to close the attempt's run: its answer says whether the
        job finished it first (see :meth:`_run_closed`). The caller records the close with
        :meth:`_record_closes`."""
        close = RunClose(item.life.run, message, reason, item.id, item.life.epoch)
        self._release_hold(item, item.life, ended_by_agent=False)
        self._closing[item.id] = close
        self._schedule_dispatch()  # the agent's room and the queue's slot are free again
        return close

    def _waits_for_close(self, item: Item) -> bool:
        """Whether the item's current attempt was ended by the queue and waits for its run's close."""
        close = self._closing.get(item.id)
        return close is not None and close.epoch == item.life.epoch and item.state.is_live

    async def _record_closes(
        self,
        closed: list[tuple[Item, RunClose]],
        then_send: Iterable[tuple[Item, Any]] = (),
        retry: tuple[str, str] | None = None,
        expired_agent: str | None = None,
    ) -> None:
        """Commit the closes to the outbox, then tell the agents and wake the drainer. When the commit
        fails, each lease is back with its agent, as the store has it, and ``retry`` (a deadline kind and
        key) comes due a heartbeat interval later to end it again. With ``expired_agent`` the closes are
        recorded only if that agent's leases are still expired in the database at the commit: renewed
        since they were read expired, the leases are back with it, as if another replica had changed them."""
        if not closed:
            return
        now = self._clock()
        # Each close moves its item's row on a revision, so that a replica that changed the item first
        # (or ended the same attempt) wins and this close is not recorded.
        fences = []
        for item, close in closed:
            life, revision = self._written(item)
            written = next_revision(revision)
            fences.append((item, close, revision, written))
            self._writing[item.id] = (life, written)
        committing = {item.lease_id for item, _ in closed} - self._closes_committing
        self._closes_committing |= committing

        async def write(tx: QueueWrite) -> set[str]:
            if expired_agent is not None and not await tx.agent_lease_expired(expired_agent):
                return {item.id for item, *_ in fences}
            stale = {
                item.id
                for item, _, revision, written in fences
                if not await tx.bump_revision(item.id, revision, written)
            }
            await tx.insert_run_closes([close for item, close in closed if item.id not in stale], now)
            return stale

        def give_back(item: Item, close: RunClose) -> None:
            if self._closing.get(item.id) is close:
                del self._closing[item.id]
                self._ended_leases.pop(item.lease_id, None)
                self._hold(self._agent(item.life.agent.removeprefix("agents/")), item)

        try:
            stale = await self._store.write(write)
        except BaseException:
            retry_at = self._clock() + self.timing.heartbeat_interval
            for item, close, _, _ in fences:
                self._writing.pop(item.id, None)
                give_back(item, close)
                if retry is not None:
                    kind, key = retry
                    self._deadlines.at(retry_at, kind, key, item.life.epoch)
            raise
        else:
            for item, close, _, written in fences:
                if item.id in stale:
                    self._writing.pop(item.id, None)
                    give_back(item, close)
                    continue
                if self._writing.get(item.id, (None, 0))[1] == written:
                    del self._writing[item.id]
                item.revision = written
            for item, message in then_send:
                if item.id not in stale:
                    self._send_to_holder(item, message)
            if stale:
                await self.refresh(stale)
        finally:
            self._closes_committing -= committing
            self._write_ended()

    async def _run_closed(self, close: RunClose, end: RunEnd, tries: int = 1) -> None:
        """The registry closed the run, or had it closed already: the outbox row goes, and in the same
        transaction the attempt that waited for it ends. When the job had finished the run, the item
        SUCCEEDED ("completed while its agent was unreachable"); otherwise it ends as the reason says
        (retried after its back-off, or FAILED or CANCELLED)."""

        async def forget(tx: QueueWrite) -> None:
            await tx.delete_run_close(close.id)

        if self._replicated:
            await self.refresh({close.item_id})  # another replica may have ended the attempt
        item = self.items.get(close.item_id)
        if self._replicated and item is not None and item.life is not item.committed:
            # A write of ours is on its way: what the database will hold is not known yet. Later.
            await self._store.retry_run_close(close, self._clock() + self.timing.heartbeat_interval, "busy")
            return
        if self._replicated and item is not None and close.reason is not None:
            self._closed_elsewhere(item, close)  # the row, read just now, says the attempt waits for it
        waiting = self._closing.get(close.item_id)
        if item is None or waiting is None or waiting.epoch != close.epoch or close.reason is None:
            await self._store.write(forget)  # no attempt waits for it (its queue was deleted)
            return
        now = self._clock()
        if end.finished:
            life = lifecycle.finished_while_away(item.life, now, exit_code=end.exit_code)
        else:
            policy = self.queues[item.queue].retry_policy
            life = lifecycle.end_attempt(item.life, close.reason, now, policy, message=close.message)
        self._move(item, life)
        try:
            await self._persist([item], also=forget)
        except ItemChanged:
            if tries >= _TRIES_AGAINST_REPLICAS:
                raise
            await self._run_closed(close, end, tries + 1)  # on what another replica made of the item
            return
        if self._closing.get(item.id) is waiting:
            del self._closing[item.id]

    def _make_pending(self, item: Item) -> None:
        if item.life.eligible_time > self._clock():
            self._deadlines.at(item.life.eligible_time, "eligible", item.id, item.life.epoch)
        else:
            self._queue_up(item)

    def _queue_up(self, item: Item) -> None:
        heapq.heappush(self._pending[item.queue], (*self._key(item), item.id))
        self._lines.pop(item.queue, None)
        self._schedule_dispatch()

    def _rank(self, item: Item) -> int:
        queue = self.queues.get(item.queue)
        return int(item.priority) if queue is not None and queue.prioritization else 0

    def _reorder(self, queue_name: str) -> None:
        if queue_name in self._backlogs:
            # The items left in the database no longer all sort after those in the index: they all leave
            # it, and the line is read again from its start.
            self._trim(queue_name, 0, order_changed=True)
        heap = [
            (self._rank(self.items[i]), seq, i) for _, seq, i in self._pending[queue_name] if i in self.items
        ]
        heapq.heapify(heap)
        self._pending[queue_name] = heap
        self._lines.pop(queue_name, None)
        for item_id in self._resting.due.get(queue_name, {}):
            self._resting.due[queue_name][item_id] = self._resting_key(self._resting.by_id[item_id])

    def _trim(self, queue_name: str, keep: int, *, order_changed: bool = False) -> None:
        """Leave in the database the queue's PENDING items at rest after its first ``keep`` in dispatch
        order, so that the index holds a bounded part of a deep queue (between one and two windows' worth
        as items arrive). Never past an item already left there: the backlog's ``after`` only moves back.
        Items being written, minted for or waiting out a failed mint stay."""
        line = sorted(
            (self._key(item), item)
            for _, _, item_id in self._pending[queue_name]
            if (item := self.items.get(item_id)) is not None and item.state is ItemState.PENDING
        )
        backlog = self._backlogs.get(queue_name)
        if not order_changed and len(line) <= keep:
            return
        after = line[keep - 1][0] if keep else None
        if backlog is not None and not order_changed and after is not None:
            after = None if backlog.after is None else min(after, backlog.after)
        kept, left = [], []
        for key, item in line:
            if (after is not None and key <= after) or not self._at_rest(item):
                kept.append((key, item))
            else:
                left.append(key)
                del self.items[item.id]
        self._pending[queue_name] = [(*key, item.id) for key, item in kept]
        heapq.heapify(self._pending[queue_name])
        self._lines.pop(queue_name, None)
        if not left and not order_changed:
            return
        count = len(left) + (backlog.count if backlog is not None else 0)
        # The greatest key left in the database, while it is known (every key changes with the order).
        last = left[-1] if left else None
        if backlog is not None:
            last = None if order_changed or backlog.last is None or last is None else max(last, backlog.last)
        self._backlogs[queue_name] = _Backlog(after, count, last)

    def _at_rest(self, item: Item) -> bool:
        """Whether the held PENDING item may leave the index: nothing of it lives only in memory (a write
        on its way, a run token minted for its next attempt or being minted, failed mints counted)."""
        minted, _ = self._run_tokens.get(item.id, ("", ""))
        return item.life is item.committed and not (
            item.id in self._writing
            or item.id in self._minting
            or minted == item.run_name(item.life.attempt + 1)
            or item.id in self._mint_failures
        )

    def _send_to_holder(self, item: Item, message: Any) -> None:
        self._send_to_holder_of(item.life, message)

    def _send_to_holder_of(self, life: ItemLife, message: Any) -> None:
        session = self._sessions.get(life.agent.removeprefix("agents/"))
        if session is not None:
            session.send(message)

    # ----- persistence ---------------------------------------------------------------------------

    async def _persist(
        self,
        items: list[Item],
        then_send: Iterable[tuple[Item, Any]] = (),
        also: Callable[[QueueWrite], Awaitable[None]] | None = None,
        limits: dict[str, int] | None = None,
    ) -> None:
        """Commit the items' new state and transitions (and ``also``, in the same transaction); then tell
        their agents and whoever watches them. ``limits``: the items are claims, and those of these queues
        are written only within the queue's concurrency limit, counted in the database under a lock of the
        queue's row (replicas: another replica's claims may not be known here yet); the others are
        refused as if another replica had changed them.

        When the commit fails, each item goes back to the life the store has, and the error is raised.
        """
        if not items:
            return
        now = self._clock()
        writes = []
        for item in items:
            known, revision = self._written(item)
            written = next_revision(revision)
            writes.append((item, item.life, len(known.history), revision, written))
            self._writing[item.id] = (item.life, written)

        async def write(tx: QueueWrite) -> tuple[set[str], set[str]]:
            stale, over_limit = set(), set()
            room = {
                name: limit - await tx.lock_live_count(name) for name, limit in sorted((limits or {}).items())
            }
            for item, life, since, revision, written in writes:
                if item.queue in room:
                    if room[item.queue] <= 0:
                        stale.add(item.id)
                        over_limit.add(item.id)
                        continue
                    room[item.queue] -= 1
                if not await tx.save_item(item.id, life, now, since, revision=revision, written=written):
                    stale.add(item.id)
            if also is not None and not stale:
                await also(tx)
            return stale, over_limit

        try:
            stale, over_limit = await self._store.write(write)
        except BaseException:
            for item, *_ in writes:
                self._roll_back(item)
            raise
        else:
            saved = []
            for item, life, since, _, written in writes:
                if item.id in stale:
                    # Over its queue's limit: tried again a moment later, not in a loop while the slot it saw
                    # free is still counted in the database (an attempt waiting for its run's close).
                    self._roll_back(
                        item, retry=False, wait=_OVER_LIMIT_WAIT if item.id in over_limit else None
                    )
                    continue
                if self._writing.get(item.id, (None, 0))[0] is life:
                    del self._writing[item.id]
                # The update time too only once committed: WatchItem and WatchQueue show the copy in memory.
                item.committed, item.revision, item.update_time = life, written, now
                tracing.committed(item, life.history, since)
                saved.append(item)
                if self.items.get(item.id) is item and self._rests(item, self._clock()):
                    # _move put it on the timer, which has not fired yet; still held (its queue not deleted)
                    self._rest(item, timed=True)
            for item, message in then_send:
                if item.id not in stale:
                    self._send_to_holder(item, message)
            for item in saved:
                self._notify(item)
            if stale:
                await self.refresh(stale)
                raise ItemChanged(stale)
        finally:
            self._write_ended()

    def _written(self, item: Item) -> tuple[ItemLife, int]:
        """The item's life as the store will have it once the writes handed to it are committed, and the
        revision of its row then: what the next write builds on."""
        writing = self._writing.get(item.id)
        if writing is not None:
            return writing
        assert item.committed is not None, "only committed items are in the index"
        return item.committed, item.revision

    def _notify(self, item: Item) -> None:
        for updates in self._watchers.get(item.id, ()):
            updates.put_nowait(item)
        for changes in self._queue_watchers.get(item.queue, ()):
            changes.item_changed(item)

    def _agent_changed(self, agent: Agent, also_tell: Iterable[str] = ()) -> None:
        """Tell the watchers of the queues the agent serves (and of ``also_tell``: those it served before
        its Hello) that it changed."""
        if self._queue_watchers:
            for queue in {*agent.queues, *also_tell}:
                for changes in self._queue_watchers.get(queue, ()):
                    changes.agent_changed(agent.agent_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("queue state change failed to commit; rolled back", exc_info=task.exception())


def _snapshot(item: Item) -> Item:
    """The item as it is now, unaffected by later changes (its life is immutable)."""
    return replace(item)


def _not_committed(request: Progress | Complete | Release, kind: MessageKind, why: str) -> Reject:
    message = f"not committed ({why}); nothing changed: send it again"
    return Reject(request.sequence, kind, request.lease_id, RejectReason.NOT_COMMITTED, message)
