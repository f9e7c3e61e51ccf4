"""What the registry commands share: the project and JSON options, and a client whose errors are one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer

from takeoff._pack import PackError
from takeoff.cli._output import fail
from takeoff.client import Client
from takeoff.errors import TakeoffError
from takeoff.models import RunState

ProjectOption = Annotated[
    str | None,
    typer.Option(
        "--project", "-p", help="Project (default: TAKEOFF_PROJECT, else `default`).", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

STATE_STYLES = {
    RunState.STARTING: "yellow",
    RunState.RUNNING: "cyan",
    RunState.FINISHED: "green",
    RunState.FAILED: "red",
    RunState.CRASHED: "red",
    RunState.KILLED: "magenta",
}


@contextmanager
def registry_client(project: str | None) -> Iterator[Client]:
    """A client of the registry; an error from it ends the command with a one-line message."""
    try:
        with Client(project=project) as client:
            yield client
    except (TakeoffError, PackError) as error:
        fail(str(error))


def styled_state(state: RunState) -> str:
    return f"[{STATE_STYLES[state]}]{state.value}[/]"


def when(moment: datetime | None) -> str:
    """A time as people read it in a table: local, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "-"
    seconds = int(((end or datetime.now(UTC)) - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    amount, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, bigger
    return f"{amount:.1f} {unit}"
