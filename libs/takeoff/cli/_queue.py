"""What the queue, launch, items and agents commands share: item states in colour, spans of time as
people type them (``30s``, ``10m``, ``1h30m``), ``KEY=VALUE`` options, item references and agents."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Annotated, Any

import typer

from takeoff.cli._output import Column, Listing, short_id, short_time, usage_error
from takeoff.models import Agent, ItemState, PendingReason

ITEM_STATE_STYLES = {
    ItemState.PENDING: "yellow",
    ItemState.LEASED: "blue",
    ItemState.BUILDING: "blue",
    ItemState.STARTING: "blue",
    ItemState.RUNNING: "cyan",
    ItemState.SUCCEEDED: "green",
    ItemState.FAILED: "red",
    ItemState.CANCELLED: "magenta",
}

PENDING_WORDS = {
    PendingReason.QUEUE_PAUSED: "paused",
    PendingReason.RETRY_BACKOFF: "back-off",
    PendingReason.CONCURRENCY_LIMIT: "at limit",
    PendingReason.NO_AGENT: "no agent",
    PendingReason.AGENTS_BUSY: "busy",
    PendingReason.WAITING_FOR_GPUS: "GPUs",
    PendingReason.QUEUED: "queued",
}
"""Why a pending item waits, in a word or two that fit a table's column; `items describe` adds the detail."""
ItemArgument = Annotated[
    str,
    typer.Argument(
        help="Item: its id or a unique prefix of it (as tables show), QUEUE/ITEM_ID, or its resource name.",
        metavar="ITEM",
        show_default=False,
    ),
]
ItemQueueOption = Annotated[
    str | None,
    typer.Option(
        "--queue",
        "-q",
        help="Queue of the item (default: whichever holds it).",
        metavar="QUEUE",
        show_default=False,
    ),
]

_SPAN = re.compile(r"(?:(?P<hours>\d+)h)?(?:(?P<minutes>\d+)m)?(?:(?P<seconds>\d+)s)?")


def styled_item_state(state: ItemState) -> str:
    return f"[{ITEM_STATE_STYLES[state]}]{state.value}[/]"


def parse_span(text: str) -> timedelta:
    """``30s``, ``10m``, ``2h``, ``1h30m`` or a number of seconds, as a timedelta."""
    if text.isdigit():
        return timedelta(seconds=int(text))
    match = _SPAN.fullmatch(text)
    if match is None or not any(match.groups()):
        raise typer.BadParameter(f"{text!r} is not a span of time such as 30s, 10m, 2h or 1h30m")
    return timedelta(**{unit: int(amount) for unit, amount in match.groupdict().items() if amount})


def show_span(span: timedelta | None, unset: str = "-") -> str:
    """A span as people type it, ``1h30m``; ``unset`` for None."""
    if span is None:
        return unset
    hours, rest = divmod(int(span.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    parts = ((hours, "h"), (minutes, "m"), (seconds, "s"))
    return "".join(f"{amount}{unit}" for amount, unit in parts if amount) or "0s"


def key_values(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """``KEY=VALUE`` options as a dict; a VALUE that parses as JSON (``3``, ``true``, ``[1, 2]``,
    ``{"a": 1}``, ``"3"``) is that value, any other VALUE is text."""
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            usage_error(f"{option} {pair!r} is not KEY=VALUE")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text
    return values


def short_item(name: str) -> str:
    """``projects/p/queues/q/items/i`` as ``q/i``, the shortest reference that works without --queue."""
    _, _, _, queue, _, item_id = name.split("/")
    return f"{queue}/{item_id}"


AGENT_COLUMNS = (
    Column("agent"),
    Column("name", free_text=True),
    Column("status"),
    Column("queues", free_text=True),
    Column("leases", justify="right"),
    Column("heartbeat"),
)


def agents_listing(agents: list[Agent], title: str, wide: bool) -> Listing:
    listing = Listing(AGENT_COLUMNS, wide=wide, title=title)
    for agent in agents:
        if not agent.connected:
            status = "[red]disconnected[/]"
        else:
            status = "[yellow]draining[/]" if agent.draining else "[green]connected[/]"
        listing.add_row(
            short_id(agent.id, wide),
            agent.display_name,
            status,
            "\n".join(queue.rsplit("/", 1)[-1] for queue in agent.queues),
            f"{len(agent.leases)}/{agent.capacity}",
            short_time(agent.last_heartbeat_time, wide),
        )
    return listing
