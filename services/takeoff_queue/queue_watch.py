"""WatchQueue: a queue's open items and its agents, first as they are, then as they change (docs/design.md §5,
"Watching a queue").

The dispatcher pushes what changes into a :class:`QueueChanges` per stream (an item's committed change, an
agent's, and after each dispatch pass "the line may have moved"); the stream's :class:`QueueWatcher` takes
them at most five times a second and reads each item and agent as it is then, so a burst of changes costs
one message. Nothing is read while nothing changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from takeoff_queue.model import Agent, Item
from takeoff_queue.pending import Waiting
from takeoff_server.errors import NotFound

if TYPE_CHECKING:
    from takeoff_queue.dispatcher import Dispatcher

MESSAGE_INTERVAL_SECONDS = 0.2
"""At most five change messages a second per stream: what changes meanwhile goes in the next one."""
FRONT_KEPT_CURRENT = 100
"""How many PENDING items, from the front of the line, have their position and pending reason resent when
they change: a dispatch moves every item behind it up one place, and resending a deep queue's whole line
five times a second would cost each message O(depth). An item further back is resent when its own state
changes, and once it moves into the front."""


class QueueChanges:
    """What changed in one queue since its watcher last took it: the dispatcher adds, the watcher takes."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.items: dict[str, Item] = {}
        """Items whose change is committed, by id (the dispatcher's own objects: read at send time)."""
        self.agents: set[str] = set()
        """Agent ids that connected, left, took or ended a lease, or sent a message (a heartbeat)."""
        self.deleted = False
        self._wake = asyncio.Event()

    def item_changed(self, item: Item) -> None:
        self.items[item.id] = item
        self._wake.set()

    def agent_changed(self, agent_id: str) -> None:
        self.agents.add(agent_id)
        self._wake.set()

    def line_may_have_moved(self) -> None:
        """A dispatch pass ran, or an agent left or drained: positions and pending reasons may differ."""
        self._wake.set()

    def queue_deleted(self) -> None:
        self.deleted = True
        self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()

    def take(self) -> tuple[list[Item], set[str]]:
        items, agents = list(self.items.values()), self.agents
        self.items, self.agents = {}, set()
        self._wake.clear()
        return items, agents


@dataclass(frozen=True, slots=True)
class QueueView:
    """One message's worth: items as committed (a PENDING one with its place and why it waits), the agents
    that serve the queue, and the agents that stopped serving it."""

    items: list[tuple[Item, Waiting | None]] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    removed_agents: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.items or self.agents or self.removed_agents)


class QueueWatcher:
    """One WatchQueue stream: its snapshot, then its coalesced changes. Remembers what it last sent of each
    open item and which agents it has shown, to send only what differs."""

    def __init__(self, dispatcher: Dispatcher, changes: QueueChanges) -> None:
        self._dispatcher = dispatcher
        self._changes = changes
        self._queue = changes.queue
        self._sent: dict[str, Waiting | None] = {}
        """open item id -> the place and reason it was last sent with (None: not PENDING then)"""
        self._near_front: set[str] = set()
        """open items last sent among the first :data:`FRONT_KEPT_CURRENT` places"""
        self._agents_shown: set[str] = set()

    async def snapshot(self) -> QueueView:
        """Every open item of the queue, PENDING ones first in dispatch order, then the others by creation;
        and every agent that serves it. Read in the same turn of the event loop as the watch began, so that
        no change falls between; the places of items past the part of the line the index holds are then
        counted in the database, as GetItem counts them."""
        dispatcher = self._dispatcher
        committed = [_as_committed(item) for item in dispatcher.items.values() if item.queue == self._queue]
        resting = dispatcher.resting_ids(self._queue)
        waits = dispatcher.waiting(committed)
        agents = [agent for agent in dispatcher.agents.values() if self._serves(agent)]
        # Items waiting out a retry's delay in the database are read there (those still waiting).
        read = [item for item in await dispatcher.read_resting(resting) if item.id not in waits]
        waits.update(dispatcher.waiting(read))
        committed += read
        waits.update(await dispatcher.counted_places(committed))

        def dispatch_order(item: Item) -> tuple[int, int]:
            waiting = waits.get(item.id)
            return (waiting.position, item.seq) if waiting else (len(committed) + 1, item.seq)

        open_items = sorted((item for item in committed if not item.state.is_terminal), key=dispatch_order)
        view = QueueView(items=[(item, waits.get(item.id)) for item in open_items], agents=agents)
        self._remember(view)
        return view

    async def changes(self) -> AsyncIterator[QueueView]:
        """What changed since the last message, once something has, at most every
        :data:`MESSAGE_INTERVAL_SECONDS`; NOT_FOUND ``QUEUE_NOT_FOUND`` once the queue is deleted."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        while True:
            await self._changes.wait()
            await asyncio.sleep(max(0.0, sent_at + MESSAGE_INTERVAL_SECONDS - loop.time()))
            if self._changes.deleted:
                raise NotFound(
                    "QUEUE_NOT_FOUND", f"queue {self._queue} was deleted", metadata={"resource": self._queue}
                )
            view = await self._changed()
            if view:
                yield view
                sent_at = loop.time()

    def send_later(self, items: Iterable[Item]) -> None:
        """Items of the last view that did not fit in its message: the next one reads them again."""
        for item in items:
            self._sent.pop(item.id, None)
            self._changes.item_changed(item)

    async def _changed(self) -> QueueView:
        dispatcher = self._dispatcher
        changed_items, changed_agents = self._changes.take()
        shown = {item.id: _as_committed(item) for item in changed_items}
        waits = dispatcher.waiting(shown.values())
        views: dict[str, tuple[Item, Waiting | None]] = {
            item_id: (item, waits.get(item_id)) for item_id, item in shown.items()
        }
        # The front of the line, where a dispatch moves every item up one place: resend what differs.
        for item, waiting in dispatcher.front_of_line(self._queue, FRONT_KEPT_CURRENT):
            if item.id not in views and item.committed is item.life and self._sent.get(item.id) != waiting:
                views[item.id] = (_as_committed(item), waiting)
        agents, removed = [], []
        for agent_id in sorted(changed_agents):
            agent = dispatcher.agents.get(agent_id)
            if agent is not None and self._serves(agent):
                agents.append(agent)
            elif agent_id in self._agents_shown:
                removed.append(f"agents/{agent_id}")
        # An item near the front that sorts past the backlog's key (one its agent released, behind items
        # left in the database) moves up as the line does, but front_of_line ends before it: its place is
        # counted in the database, as GetItem counts it, and resent when it differs (review R5).
        near = {
            item_id: _as_committed(held)
            for item_id in self._near_front
            if item_id not in views
            and (held := dispatcher.items.get(item_id)) is not None
            and held.committed is held.life
        }
        for item_id, waiting in (await dispatcher.counted_places([*shown.values(), *near.values()])).items():
            if item_id in shown:
                views[item_id] = (shown[item_id], waiting)
            elif self._sent.get(item_id) != waiting:
                views[item_id] = (near[item_id], waiting)
        view = QueueView(list(views.values()), agents, removed)
        self._remember(view)
        return view

    def _remember(self, view: QueueView) -> None:
        for item, waiting in view.items:
            if item.state.is_terminal:
                self._sent.pop(item.id, None)  # sent once ended, then no more
            else:
                self._sent[item.id] = waiting
            if waiting is not None and waiting.position <= FRONT_KEPT_CURRENT and not item.state.is_terminal:
                self._near_front.add(item.id)
            else:
                self._near_front.discard(item.id)
        self._agents_shown.update(agent.agent_id for agent in view.agents)
        self._agents_shown.difference_update(name.removeprefix("agents/") for name in view.removed_agents)

    def _serves(self, agent: Agent) -> bool:
        """Whether the agent lists the queue and is connected, or still holds leases."""
        return self._queue in agent.queues and (agent.connected or bool(agent.leases))


def _as_committed(item: Item) -> Item:
    """The item as the store has it: the dispatcher may have moved it on in memory, and a commit that fails
    moves it back (items in the index are always committed once)."""
    assert item.committed is not None, "only committed items are in the index"
    return replace(item, life=item.committed)
