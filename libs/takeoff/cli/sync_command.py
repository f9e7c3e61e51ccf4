"""``takeoff sync DIR...``: upload runs written in offline mode, each exactly once (``takeoff._sync``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from takeoff._offline import OfflineRunError
from takeoff._sync import SyncResult, find_offline_runs, sync_run
from takeoff.cli._output import console, error_console, print_json, usage_error
from takeoff.cli._registry import JsonOption, one_line, takeoff_client
from takeoff.client import Client
from takeoff.errors import TakeoffError


def sync(
    directories: Annotated[
        list[Path],
        typer.Argument(
            help="An offline run directory, or a directory holding offline-run-* directories"
            " (such as the job's takeoff/ directory).",
            metavar="DIR",
            show_default=False,
        ),
    ],
    project: Annotated[
        str | None,
        typer.Option(
            "--project", "-p", help="Upload into this project (default: the run's own).", show_default=False
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Upload runs written in offline mode (TAKEOFF_MODE=offline) to the registry.

    Each run is uploaded once: syncing it again changes nothing, and a sync that stopped half way is
    finished by running it again.
    """
    try:
        run_directories = [run for directory in directories for run in find_offline_runs(directory)]
    except OfflineRunError as error:
        usage_error(str(error))
    with takeoff_client(project) as client:
        results = [_sync_one(directory, client, project, json_output) for directory in run_directories]
    if json_output:
        print_json([_as_json(result) for result in results if result is not None])
    if None in results:
        raise typer.Exit(1)


def _sync_one(directory: Path, client: Client, project: str | None, json_output: bool) -> SyncResult | None:
    """Sync one run and say how it went; None (after saying why) when it could not be synced, so that the
    other runs still are."""
    try:
        result = sync_run(directory, client, project=project)
    except (TakeoffError, OfflineRunError) as error:
        message = one_line(error) if isinstance(error, TakeoffError) else str(error)
        failure = Text.assemble(("error:", "bold red"), f" cannot sync {directory}: {message}")
        error_console.print(failure, soft_wrap=True)
        return None
    if not json_output:
        console.print(_said(result), markup=False, soft_wrap=True)
    return result


def _said(result: SyncResult) -> str:
    if result.already_synced:
        return f"{result.directory}: already synced as {result.run}"
    unfinished = "" if result.finished_offline else " (the job ended without finishing the run)"
    rows = "1 row" if result.rows == 1 else f"{result.rows} rows"
    return f"synced {result.directory} as {result.run}: {rows}, {result.state}{unfinished}"


def _as_json(result: SyncResult) -> dict[str, object]:
    return {
        "directory": str(result.directory),
        "run": result.run,
        "rows": result.rows,
        "state": result.state.value,
        "already_synced": result.already_synced,
        "finished_offline": result.finished_offline,
    }
