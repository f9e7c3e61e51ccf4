"""How the CLI speaks: rich tables for people that fit 80 columns, JSON for scripts, one-line errors, no
tracebacks, and exit codes that tell a usage error (2) from a failure (1)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
error_console = Console(stderr=True)

USAGE_EXIT_CODE = 2
"""What a command exits with when it was called wrongly, as click does for the errors it finds itself."""
SHORT_ID_LENGTH = 8
"""How much of a generated id a table shows: every command takes a unique prefix, and 8 characters of
a run's 12 or an item's 20 tell them apart in any project people browse."""
FREE_TEXT_WIDTH = 12
"""The narrowest a column of free text (a name, a message) is folded to before a table outgrows the
terminal."""
RECENT = timedelta(days=180)
"""Older times show their year, as ``ls -l`` does."""

WideOption = Annotated[
    bool, typer.Option("--wide", "-w", help="Show every column, whole ids and full times.")
]


def fail(message: str, code: int = 1) -> NoReturn:
    # Text, not markup: messages quote user input and field paths such as `entrypoint[0]`.
    error_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    """End a command that was called wrongly (a malformed ``KEY=VALUE``, an unknown state): exit 2."""
    fail(message, USAGE_EXIT_CODE)


def confirm_deletion(what: str) -> None:
    """Ask before deleting ``what`` (commands skip this with ``--yes``). A no stops the command (exit 1);
    no answer at all, as from a script whose input is closed, is a usage error (exit 2) naming --yes."""
    try:
        agreed = typer.confirm(f"delete {what}?", default=False)
    except typer.Abort:
        usage_error(f"deleting {what} needs a yes: answer on a terminal, or give --yes")
    if not agreed:
        fail("nothing deleted")


def short_id(identifier: str, wide: bool = False) -> str:
    """The start of a generated id that commands take as a prefix; all of it with ``--wide``."""
    return identifier if wide else identifier[:SHORT_ID_LENGTH]


def short_time(moment: datetime | None, wide: bool = False, now: datetime | None = None) -> str:
    """A time in the local zone as tables show it: ``14:03`` today, ``Dec 02`` this half-year,
    ``2025-11-30`` before; to the second with ``--wide``."""
    if moment is None:
        return "-"
    local = moment.astimezone()
    if wide:
        return local.strftime("%Y-%m-%d %H:%M:%S")
    current = (now or datetime.now(local.tzinfo)).astimezone(local.tzinfo)
    if local.date() == current.date():
        return local.strftime("%H:%M")
    return local.strftime("%b %d" if abs(current - local) < RECENT else "%Y-%m-%d")


@dataclass(frozen=True)
class Column:
    """A column of a :class:`Listing`. Only ``free_text`` columns (names, messages, lists) may fold to
    fit the terminal; the others (ids, states, times, numbers) are never wrapped or cut, so an id can be
    copied whole into the next command."""

    header: str
    justify: Literal["left", "right"] = "left"
    free_text: bool = False
    wide_only: bool = False
    """Shown only with ``--wide``: what an 80-column terminal has no room for."""


class Listing:
    """A table of records for people: fits 80 columns by shortening ids and times (see :func:`short_id`,
    :func:`short_time`) and folding free text, never by cutting a value another command takes."""

    def __init__(self, columns: Sequence[Column], *, wide: bool, title: str | None = None) -> None:
        self._columns = [column for column in columns if wide or not column.wide_only]
        self._shown = [wide or not column.wide_only for column in columns]
        self._widths = [_width(column.header) for column in self._columns]
        # Light rules and one-space gaps: borders would take a fifth of 80 columns.
        self.table = Table(
            title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1)
        )
        for column in self._columns:
            self.table.add_column(
                column.header,
                justify=column.justify,
                no_wrap=not column.free_text,
                overflow="fold" if column.free_text else "ignore",
            )

    def add_row(self, *cells: str) -> None:
        """One record: a cell (rich markup) for every column, the ``wide_only`` ones included."""
        shown = [cell for cell, show in zip(cells, self._shown, strict=True) if show]
        self._widths = [max(width, _width(cell)) for width, cell in zip(self._widths, shown, strict=True)]
        self.table.add_row(*shown)

    def print(self) -> None:
        needed = self._needed_width()
        if needed <= console.width:
            console.print(self.table)
            return
        # The unbreakable columns alone overflow the terminal: print wider (the terminal wraps the lines)
        # rather than let rich shrink them all, which cuts ids and drops whole columns.
        wider = Console(file=console.file, width=needed, force_terminal=console.is_terminal)
        wider.print(self.table)

    def _needed_width(self) -> int:
        """The narrowest the table gets with every unbreakable column whole and free text folded to at
        most FREE_TEXT_WIDTH; each column adds 3 (a gap on each side, a rule or an edge) but for one edge."""
        content = sum(
            min(width, FREE_TEXT_WIDTH) if column.free_text else width
            for column, width in zip(self._columns, self._widths, strict=True)
        )
        return content + 3 * len(self._columns) - 1


def _width(markup: str) -> int:
    return max((Text.from_markup(line).cell_len for line in markup.splitlines()), default=0)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON; dataclasses become objects, times ISO 8601 strings, spans seconds."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=jsonable))


def jsonable(value: Any) -> Any:
    """``json.dumps``' ``default`` for what commands print: see :func:`print_json`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Private fields, such as the client an item handle calls, are plumbing rather than data.
        fields = dataclasses.fields(value)
        return {field.name: getattr(value, field.name) for field in fields if not field.name.startswith("_")}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
