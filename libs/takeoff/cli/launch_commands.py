"""``takeoff launch`` and ``takeoff items list|describe|cancel|relaunch``: put jobs on queues, follow them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from takeoff.cli._output import console, fail, print_json
from takeoff.cli._queue import (
    ItemArgument,
    ItemQueueOption,
    item_name,
    key_values,
    parse_span,
    short_item,
    show_span,
    styled_item_state,
)
from takeoff.cli._registry import (
    JsonOption,
    ProjectOption,
    SecretOption,
    duration,
    read_json_object,
    takeoff_client,
    version_ref,
    when,
)
from takeoff.models import FailureReason, Item, ItemState, ItemTransition, Priority

items_app = typer.Typer(help="List, inspect, cancel and relaunch queue items.", no_args_is_help=True)

OUTCOME_EXIT_CODES = {ItemState.SUCCEEDED: 0, ItemState.FAILED: 1, ItemState.CANCELLED: 3}
"""`launch --wait` exits with these; 2 is left to usage errors, which the command line reports with it."""
INTERRUPTED_EXIT_CODE = 130


def launch(
    *,
    job: Annotated[
        str,
        typer.Argument(help="Job reference: JOB, JOB:ALIAS, JOB:vN or a resource name.", show_default=False),
    ],
    queue: Annotated[
        str, typer.Option("--queue", "-q", help="Queue id or resource name.", show_default=False)
    ],
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            help="Run config value KEY=VALUE, VALUE as JSON when it parses (3, true, [1, 2], "
            "'\"3\"'), else text; over --config-file (repeatable).",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            help="Run config (a JSON or YAML file).", exists=True, dir_okay=False, show_default=False
        ),
    ] = None,
    set_var: Annotated[
        list[str] | None,
        typer.Option(
            "--set-var", help="Template variable of the queue NAME=VALUE, VALUE as for --config (repeatable)."
        ),
    ] = None,
    resource_config: Annotated[
        Path | None,
        typer.Option(
            help="Resource config merged over the queue's (a JSON or YAML file), e.g. gpus: 2.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    priority: Annotated[Priority, typer.Option(help="Priority on the queue.", case_sensitive=False)] = (
        Priority.MEDIUM
    ),
    max_attempts: Annotated[int, typer.Option(help="Attempts, the first included (0: the queue's).")] = 0,
    max_run_time: Annotated[
        timedelta | None,
        typer.Option(
            parser=parse_span,
            metavar="SPAN",
            help="Time it may run, e.g. 2h or 1h30m (default: the queue's).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Display name of its runs.")] = "",
    secret: SecretOption = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the item until it ends; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED.")
    ] = False,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Put a job on a queue and print the item's name.

    With --wait, follow the item until it ends and exit with its outcome:
    0 SUCCEEDED, 1 FAILED, 3 CANCELLED. Otherwise 1 is an error, 2 a usage error,
    and 130 an interrupt, which stops following but not the item.
    """
    run_config = {**(read_json_object(config_file) or {}), **key_values(config, "--config")}
    with takeoff_client(project) as client:
        item = client.launch(
            job,
            queue,
            config=run_config,
            template_variables=key_values(set_var, "--set-var"),
            resource_config=read_json_object(resource_config),
            priority=priority,
            max_attempts=max_attempts,
            max_run_time=max_run_time,
            run_name=name,
            secrets=secret or (),
        )
        if json_output:
            if wait:
                _wait(item)
            print_json(item)
        else:
            typer.echo(item.name)
            if wait:
                _follow(item)
    if wait:
        raise typer.Exit(OUTCOME_EXIT_CODES[item.state])


@items_app.command("list")
def list_items(
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Only items of this queue.", show_default=False)
    ] = None,
    state: Annotated[
        list[ItemState] | None,
        typer.Option(help="Only items in this state (repeatable).", case_sensitive=False, show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many items, newest first.")] = 50,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the items of a queue, or of every queue of a project, newest first."""
    with takeoff_client(project) as client:
        items = list(itertools.islice(client.list_items(queue=queue, states=state or []), limit))
        if json_output:
            print_json(items)
            return
        table = Table(title=f"items in {queue or client.project}", title_justify="left")
        table.add_column("item", no_wrap=True)  # to copy into other commands whole
        for column in ("job", "state", "priority", "attempt", "enqueued", "duration"):
            table.add_column(column)
        for item in items:
            table.add_row(
                short_item(item.name),
                version_ref(item.job_version),
                _styled_state(item),
                item.priority,
                f"{item.attempt}/{item.max_attempts}",
                when(item.enqueue_time),
                duration(item.enqueue_time, item.end_time),
            )
        console.print(table if items else "no items")


@items_app.command("describe")
def describe(
    item: ItemArgument,
    queue: ItemQueueOption = None,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show an item: what was launched, how it stands, and every change of its state."""
    with takeoff_client(project) as client:
        found = client.get_item(item_name(client, item, queue))
    if json_output:
        print_json(found)
        return
    console.print(_overview(found))
    console.print(_transitions_table(found.transitions))


@items_app.command("cancel")
def cancel(
    item: ItemArgument,
    queue: ItemQueueOption = None,
    message: Annotated[str, typer.Option(help="Why, recorded with the item.")] = "",
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Cancel an item: a waiting one at once, a running one once its agent has stopped it."""
    with takeoff_client(project) as client:
        cancelled = client.cancel_item(item_name(client, item, queue), message=message)
    if json_output:
        print_json(cancelled)
    elif cancelled.state is ItemState.CANCELLED:
        console.print(f"[magenta]cancelled[/] {short_item(cancelled.name)}")
    else:
        console.print(
            f"cancel requested: {short_item(cancelled.name)} is {styled_item_state(cancelled.state)} on "
            f"{cancelled.agent}, and ends CANCELLED once the agent has stopped it"
        )


@items_app.command("relaunch")
def relaunch(
    item: ItemArgument,
    queue: ItemQueueOption = None,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Launch an ended item again: same job version, config and settings, as a new item; print its name."""
    with takeoff_client(project) as client:
        again = client.relaunch_item(item_name(client, item, queue))
    if json_output:
        print_json(again)
    else:
        typer.echo(again.name)


def _wait(item: Item, on_change: Callable[[Item], None] | None = None) -> None:
    """Follow ``item`` to its end; an interrupt stops following (not the item) and exits."""
    try:
        item.wait(on_change=on_change)
    except KeyboardInterrupt:
        fail(
            f"stopped following {item.name}; it carries on (takeoff items cancel {short_item(item.name)})",
            INTERRUPTED_EXIT_CODE,
        )


def _follow(item: Item) -> None:
    """Show the item's transitions as they happen, then how it ended."""
    printed = 0
    with console.status("waiting for the queue...") as status:

        def show(current: Item) -> None:
            nonlocal printed
            for transition in current.transitions[printed:]:
                console.print(_transition_line(transition))
            printed = len(current.transitions)
            status.update(f"{styled_item_state(current.state)}, attempt {current.attempt} ...")

        _wait(item, show)
    console.print(_outcome(item))


def _transition_line(transition: ItemTransition) -> str:
    change = styled_item_state(transition.to_state)
    if transition.from_state:
        change = f"{styled_item_state(transition.from_state)} → {change}"
    parts = [
        when(transition.time),
        change,
        f"attempt {transition.attempt}" if transition.attempt else "",
        transition.agent,
        transition.actor and f"by {transition.actor}",
        transition.reason or "",
        transition.message,
    ]
    return "  ".join(part for part in parts if part)


def _outcome(item: Item) -> str:
    text = f"{short_item(item.name)} {styled_item_state(item.state)}"
    if item.reason and item.reason is not FailureReason.CANCELLED:
        text += f" {item.reason}"
    if item.exit_code is not None:
        text += f" (exit code {item.exit_code})"
    if item.message:
        text += f": {item.message}"
    if item.run:
        text += f"\nits log: takeoff logs {item.run}"
    return text


def _styled_state(item: Item) -> str:
    text = styled_item_state(item.state)
    return text + " (cancel requested)" if item.cancel_requested and not item.ended else text


def _overview(item: Item) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("item", f"{short_item(item.name)}  ({item.name})")
    table.add_row("job", f"{version_ref(item.job_version)}  (launched as {item.job})")
    table.add_row("state", _styled_state(item))
    if item.reason:
        table.add_row("reason", item.reason)
    if item.exit_code is not None:
        table.add_row("exit code", str(item.exit_code))
    if item.message:
        table.add_row("message", item.message)
    if item.creator:
        table.add_row("launched by", item.creator)
    table.add_row("priority", item.priority)
    table.add_row("attempt", f"{item.attempt} of {item.max_attempts}")
    table.add_row("max run time", show_span(item.max_run_time, unset="no limit"))
    if item.run:
        table.add_row("run", item.run + (f"  ({item.run_display_name})" if item.run_display_name else ""))
    if item.agent:
        table.add_row("agent", item.agent)
    table.add_row("run config", _json_text(item.run_config))
    if item.template_variables:
        table.add_row("template variables", _json_text(item.template_variables))
    table.add_row("resource config", _json_text(item.resource_config))
    if item.secrets:
        table.add_row("secrets", "\n".join(str(mount) for mount in item.secrets))
    table.add_row("enqueued", when(item.enqueue_time))
    table.add_row("ended", when(item.end_time))
    if item.relaunched_from:
        table.add_row("relaunched from", item.relaunched_from)
    return table


def _transitions_table(transitions: list[ItemTransition]) -> Table:
    table = Table(title="history", title_justify="left")
    for column in ("time", "from", "to", "attempt", "agent", "actor", "reason", "message"):
        table.add_column(column, overflow="fold")
    for transition in transitions:
        table.add_row(
            when(transition.time),
            styled_item_state(transition.from_state) if transition.from_state else "-",
            styled_item_state(transition.to_state),
            str(transition.attempt or "-"),
            transition.agent or "-",
            transition.actor or "-",
            transition.reason or "",
            transition.message,
        )
    return table


def _json_text(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def register(app: typer.Typer) -> None:
    app.command()(launch)
    app.add_typer(items_app, name="items")
