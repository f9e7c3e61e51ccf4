"""How the CLI speaks: rich tables for people, JSON for scripts, one-line errors, no tracebacks."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

console = Console()
error_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    # Text, not markup: messages quote user input and field paths such as `entrypoint[0]`.
    error_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON; dataclasses become objects, times ISO 8601 strings, spans seconds."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Private fields, such as the client an item handle calls, are plumbing rather than data.
        fields = dataclasses.fields(value)
        return {field.name: getattr(value, field.name) for field in fields if not field.name.startswith("_")}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
