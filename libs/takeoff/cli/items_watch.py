"""``takeoff items list --queue QUEUE --watch``: a queue's open items and its agents as they change, pushed
by the queue service (WatchQueue). On a terminal, one table redrawn in place; otherwise (a pipe, a log
file) one line per change, or one JSON object per change with ``--json``. Ctrl-C stops it (exit 0)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from queue import Empty, SimpleQueue

from rich.console import Group
from rich.live import Live
from rich.markup import escape

from takeoff.cli._output import Column, Listing, console, jsonable, short_id, short_time
from takeoff.cli._queue import PENDING_WORDS, agents_listing, short_item, styled_item_state
from takeoff.cli._registry import version_ref
from takeoff.client import Client
from takeoff.models import Agent, Item, ItemState, QueueChange, QueueView

ITEM_COLUMNS = (
    Column("item"),
    Column("job", free_text=True),
    Column("state"),
    Column("#", justify="right"),
    Column("waiting", free_text=True),
    Column("tries"),
    Column("agent", wide_only=True),
    Column("added"),
)


def watch_items(
    client: Client,
    queue: str,
    *,
    states: Sequence[ItemState],
    limit: int,
    wide: bool,
    json_output: bool,
) -> None:
    """Follow ``queue`` until Ctrl-C; ``states`` keeps items in them, ``limit`` rows fit the table."""
    # Ctrl-C is how a watch ends, also where it was started with SIGINT ignored (a background job of a
    # script, which a later `kill -INT` must still stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    changes = _interruptible(client.watch_queue(queue))
    try:
        if console.is_terminal and not json_output:
            _redraw(changes, queue, states=states, limit=limit, wide=wide)
        else:
            for change in changes:
                shown = [item for item in change.items if not states or item.state in states]
                if json_output:
                    _print(_json_line(change, shown))
                else:
                    for line in _change_lines(change, shown):
                        _print(line)
    except KeyboardInterrupt:
        pass  # how a watch is ended: not a failure (closing the client's channel ends the stream)


def _interruptible(changes: Iterator[QueueChange]) -> Iterator[QueueChange]:
    """``changes``, read on a thread of their own: a wait inside a gRPC stream does not see Ctrl-C, so the
    main thread waits in short steps instead and stops at once, not when the next change arrives."""
    arrived: SimpleQueue[QueueChange | BaseException | None] = SimpleQueue()

    def read() -> None:
        try:
            for change in changes:
                arrived.put(change)
            arrived.put(None)
        except BaseException as error:  # raised again on the main thread
            arrived.put(error)

    threading.Thread(target=read, name="takeoff-watch", daemon=True).start()
    while True:
        try:
            change = arrived.get(timeout=0.2)
        except Empty:
            continue
        if change is None:
            return
        if isinstance(change, BaseException):
            raise change
        yield change


def _redraw(
    changes: Iterable[QueueChange], queue: str, *, states: Sequence[ItemState], limit: int, wide: bool
) -> None:
    view = QueueView()
    with Live(console=console, auto_refresh=False) as live:
        for change in changes:
            view.apply(change)
            items = [item for item in view.in_dispatch_order() if not states or item.state in states]
            live.update(
                _view_table(queue, items, list(view.agents.values()), limit=limit, wide=wide), refresh=True
            )


def _view_table(queue: str, items: list[Item], agents: list[Agent], *, limit: int, wide: bool) -> Group:
    more = f", the first {limit} shown" if len(items) > limit else ""
    listing = Listing(
        ITEM_COLUMNS, wide=wide, title=f"open items in {queue}: {len(items)}{more} (Ctrl-C stops watching)"
    )
    for item in items[:limit]:
        listing.add_row(
            short_id(item.id, wide),
            version_ref(item.job_version),
            styled_item_state(item.state),
            str(item.position) if item.position else "",
            escape(_waiting(item)),
            f"{item.attempt}/{item.max_attempts}",
            short_id(item.agent.removeprefix("agents/"), wide),
            short_time(item.enqueue_time, wide),
        )
    if not agents:
        return Group(listing.table, "no agent serves this queue")
    return Group(listing.table, agents_listing(agents, "agents", wide).table)


def _waiting(item: Item) -> str:
    """Why a pending item waits, with its numbers (``at limit: 2 of 2 running``); what a leased one is
    asked to do."""
    if item.pending_reason is not None:
        words = PENDING_WORDS[item.pending_reason]
        return f"{words}: {item.pending_detail}" if item.pending_detail else words
    return "cancel requested" if item.cancel_requested and not item.ended else ""


def _change_lines(change: QueueChange, items: list[Item]) -> Iterator[str]:
    """One line per item and agent of a change, led by the time: ``14:03:07 cpu/3f9a... PENDING #1 no
    agent``; the snapshot's lines first, marked once."""
    now = datetime.now().astimezone().strftime("%H:%M:%S")
    if change.snapshot:
        yield f"{now} watching: {len(items)} open items, {len(change.agents)} agents"
    for item in items:
        place = f" #{item.position}" if item.position else ""
        waiting = f" {_waiting(item)}" if _waiting(item) else ""
        why_failed = f" {item.reason}" if item.state is ItemState.FAILED and item.reason else ""
        yield f"{now} {short_item(item.name)} {item.state}{place}{waiting}{why_failed}"
    for agent in change.agents:
        status = "draining" if agent.draining else "connected" if agent.connected else "disconnected"
        yield f"{now} agent {agent.id} {status} {len(agent.leases)}/{agent.capacity}"
    for name in change.removed_agents:
        yield f"{now} agent {name.removeprefix('agents/')} gone"


def _json_line(change: QueueChange, items: list[Item]) -> str:
    return json.dumps(
        {
            "snapshot": change.snapshot,
            "items": items,
            "agents": change.agents,
            "removed_agents": change.removed_agents,
        },
        sort_keys=True,
        default=jsonable,
    )


def _print(line: str) -> None:
    # flush: a reader at the other end of a pipe sees each change as it comes
    print(line, flush=True)
