"""``takeoff launch`` and ``takeoff items list|describe|cancel|relaunch``: put jobs on queues, follow them."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text

from takeoff.cli._output import (
    Column,
    Listing,
    WideOption,
    console,
    error_console,
    fail,
    print_json,
    short_id,
    short_time,
    usage_error,
)
from takeoff.cli._queue import (
    PENDING_WORDS,
    ItemArgument,
    ItemQueueOption,
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
    log_line_text,
    one_line,
    read_json_object,
    takeoff_client,
    version_ref,
    when,
)
from takeoff.cli.items_watch import watch_items
from takeoff.cli.job_commands import split_command
from takeoff.cli.queue_commands import print_item_trace
from takeoff.client import Client
from takeoff.errors import NotFoundError, TakeoffError
from takeoff.models import (
    FailureReason,
    Item,
    ItemState,
    ItemTransition,
    PendingReason,
    Priority,
)

items_app = typer.Typer(help="List, inspect, cancel and relaunch queue items.", no_args_is_help=True)

OUTCOME_EXIT_CODES = {ItemState.SUCCEEDED: 0, ItemState.FAILED: 1, ItemState.CANCELLED: 3}
"""`launch --wait` exits with these; 2 is left to usage errors, which the command line reports with it."""
TIMEOUT_EXIT_CODE = 124
"""As timeout(1) exits when its command runs out of time."""
INTERRUPTED_EXIT_CODE = 130
LOG_DRAIN_SECONDS = 10.0
"""How long an ended item's log may take to reach its end, for ``--logs``, before the outcome is shown."""
RUN_POLL_SECONDS = 0.5
"""How often ``--logs`` looks for a run its job has not created yet."""

WAITING_NOTICES = {
    PendingReason.NO_AGENT: "waiting: no connected agent serves {queue} (takeoff agent -q {queue})",
    PendingReason.QUEUE_PAUSED: "waiting: queue {queue} is paused (takeoff queue resume {queue})",
}
"""What `launch --wait` says, once, when the item waits for something only a person can change."""


def launch(
    *,
    job: Annotated[
        str,
        typer.Argument(
            metavar="JOB",
            help="Job reference: JOB, JOB:ALIAS, JOB:vN or a resource name.",
            show_default=False,
        ),
    ],
    queue: Annotated[
        str,
        typer.Option("--queue", "-q", metavar="QUEUE", help="Queue id or resource name.", show_default=False),
    ],
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            metavar="KEY=VALUE",
            help="Run config value, VALUE as JSON when it parses (3, true, [1, 2], "
            "'\"3\"'), else text; over --config-file (repeatable).",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Run config (a JSON or YAML file).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    set_var: Annotated[
        list[str] | None,
        typer.Option(
            "--set-var",
            metavar="NAME=VALUE",
            help="Template variable of the queue, VALUE as for --config (repeatable).",
            show_default=False,
        ),
    ] = None,
    resource_config_file: Annotated[
        Path | None,
        typer.Option(
            "--resource-config-file",
            "--resource-config",
            metavar="FILE",
            help="Resource config merged over the queue's (a JSON or YAML file), e.g. gpus: 2.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    entrypoint: Annotated[
        str | None,
        typer.Option(
            "--entrypoint",
            "-E",
            metavar="COMMAND",
            help='Command to run instead of the job\'s, e.g. "python eval.py" (split as a shell would;'
            " refused on secure queues).",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        Priority | None,
        typer.Option(
            help="Priority on a queue that honours priorities (default: medium).",
            case_sensitive=False,
            show_default=False,
        ),
    ] = None,
    max_attempts: Annotated[
        int, typer.Option(metavar="N", help="Attempts, the first included (0: the queue's).")
    ] = 0,
    max_run_time: Annotated[
        timedelta | None,
        typer.Option(
            parser=parse_span,
            metavar="SPAN",
            help="Time it may run, e.g. 2h or 1h30m (default: the queue's).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="Display name of its runs.", show_default=False)
    ] = "",
    secret: SecretOption = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Follow the item until it ends; exit 0 SUCCEEDED, 1 FAILED, 3 CANCELLED."
        ),
    ] = False,
    timeout: Annotated[
        timedelta | None,
        typer.Option(
            parser=parse_span,
            metavar="SPAN",
            help="Stop following after SPAN (e.g. 600 or 10m) and exit 124; the item carries on.",
            show_default=False,
        ),
    ] = None,
    logs: Annotated[bool, typer.Option("--logs", help="Follow the item, printing the job's output.")] = False,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Put a job on a queue and print the item's name.

    With --wait (or --logs, or --timeout), follow the item until it ends and exit
    with its outcome: 0 SUCCEEDED, 1 FAILED, 3 CANCELLED; 124 when --timeout
    passes first. Otherwise 1 is an error and 2 a usage error. 130 is an
    interrupt, which stops following but not the item.
    """
    if logs and json_output:
        usage_error("--logs prints the job's output, which would break --json: give one of them")
    follow = wait or logs or timeout is not None
    run_config = {**(read_json_object(config_file) or {}), **key_values(config, "--config")}
    with takeoff_client(project) as client:
        if priority is not None:
            _warn_if_priority_ignored(client, queue, priority)
        item = client.launch(
            job,
            queue,
            config=run_config,
            template_variables=key_values(set_var, "--set-var"),
            resource_config=read_json_object(resource_config_file),
            entrypoint=split_command(entrypoint, "--entrypoint"),
            priority=priority or Priority.MEDIUM,
            max_attempts=max_attempts,
            max_run_time=max_run_time,
            run_name=name,
            secrets=secret or (),
        )
        if not json_output:
            typer.echo(item.name)
        if follow:
            _follow(client, item, timeout, logs=logs, quiet=json_output)
        if json_output:
            print_json(item)
    if follow:
        raise typer.Exit(OUTCOME_EXIT_CODES[item.state])


def _warn_if_priority_ignored(client: Client, queue: str, priority: Priority) -> None:
    if not client.get_queue(queue).prioritization:
        _warn(f"queue {queue} serves items in launch order, so --priority {priority} changes nothing")


@items_app.command("list")
def list_items(
    *,
    queue: Annotated[
        str | None,
        typer.Option("--queue", "-q", metavar="QUEUE", help="Only items of this queue.", show_default=False),
    ] = None,
    state: Annotated[
        list[ItemState] | None,
        typer.Option(help="Only items in this state (repeatable).", case_sensitive=False, show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(metavar="N", help="Show at most N items, newest first.")] = 50,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Follow the --queue's open items and agents as they change until Ctrl-C: a table redrawn"
            " in place on a terminal, else one line (with --json, one object) per change.",
        ),
    ] = False,
    wide: WideOption = False,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the items of a queue, or of every queue of a project, newest first; a pending item with its
    place in the queue (#1 is next) and why it waits."""
    if watch:
        if queue is None:
            usage_error("--watch follows one queue: give --queue QUEUE")
        with takeoff_client(project) as client:
            watch_items(client, queue, states=state or [], limit=limit, wide=wide, json_output=json_output)
        return
    with takeoff_client(project) as client:
        items = list(itertools.islice(client.list_items(queue=queue, states=state or []), limit))
        if json_output:
            print_json(items)
            return
        if not items:
            console.print("no items")
            return
        listing = Listing(
            [
                Column("item"),
                Column("queue", free_text=True),
                Column("job", free_text=True),
                Column("state"),
                Column("why", free_text=True),
                Column("priority", wide_only=True),
                Column("tries"),
                Column("added"),
                Column("took", justify="right"),
            ],
            wide=wide,
            title=f"items in {queue or client.project}",
        )
        for item in items:
            listing.add_row(
                short_id(item.name.rsplit("/", 1)[-1], wide),
                item.queue.rsplit("/", 1)[-1],
                version_ref(item.job_version),
                styled_item_state(item.state),
                escape(_why(item)),
                item.priority,
                f"{item.attempt}/{item.max_attempts}",
                short_time(item.enqueue_time, wide),
                duration(item.enqueue_time, item.end_time),
            )
        listing.print()


@items_app.command("describe")
def describe(
    item: ItemArgument,
    queue: ItemQueueOption = None,
    project: ProjectOption = None,
    json_output: JsonOption = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="The item's timeline (each step, how long the one before it took) and where its trace is.",
        ),
    ] = False,
) -> None:
    """Show an item: what was launched, how it stands (a pending one: its place in the queue and why it
    waits), and every change of its state."""
    with takeoff_client(project) as client:
        found = client.get_item(item, queue=queue)
    if json_output:
        print_json(found)
        return
    if trace:
        print_item_trace(found)
        return
    console.print(_overview(found))
    console.print(_transitions_table(found.transitions))


@items_app.command("cancel")
def cancel(
    item: ItemArgument,
    queue: ItemQueueOption = None,
    message: Annotated[
        str, typer.Option(metavar="TEXT", help="Why, recorded with the item (see `items describe`).")
    ] = "",
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Cancel an item: a waiting one at once, a running one once its agent has stopped it."""
    with takeoff_client(project) as client:
        cancelled = client.cancel_item(item, queue=queue, message=message)
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
        again = client.relaunch_item(item, queue=queue)
    if json_output:
        print_json(again)
    else:
        typer.echo(again.name)


def _follow(client: Client, item: Item, timeout: timedelta | None, *, logs: bool, quiet: bool) -> None:
    """Follow ``item`` to its end: unless ``quiet``, its transitions, its run and why it waits as they
    come, the job's output with ``logs``, then how it ended. Exits 124 once ``timeout`` passes, and 130 on
    an interrupt; the item carries on either way."""
    progress = _Progress(client, quiet=quiet, logs=logs)
    try:
        if quiet:
            item.wait(timeout.total_seconds() if timeout else None, progress.show)
        else:
            with console.status("waiting for the queue...") as status:
                progress.status = status
                item.wait(timeout.total_seconds() if timeout else None, progress.show)
    except TimeoutError:
        fail(
            f"{short_item(item.name)} has not ended after {show_span(timeout)}; it carries on"
            f" (takeoff items cancel {short_item(item.name)})",
            TIMEOUT_EXIT_CODE,
        )
    except KeyboardInterrupt:
        fail(
            f"stopped following {item.name}; it carries on (takeoff items cancel {short_item(item.name)})",
            INTERRUPTED_EXIT_CODE,
        )
    progress.finish_logs()
    if not quiet:
        console.print(_outcome(item))


class _Progress:
    """What `launch --wait` shows of an item as it changes; one line per event, each fitting 80 columns."""

    def __init__(self, client: Client, *, quiet: bool, logs: bool) -> None:
        self.client = client
        self.quiet = quiet
        self.logs = logs
        self.status: Status | None = None
        self.transitions_shown = 0
        self.run = ""
        self.waiting_for: PendingReason | None = None
        self.asked_queue = False
        self.log: _RunLog | None = None

    def show(self, item: Item) -> None:
        if not self.quiet:
            for transition in item.transitions[self.transitions_shown :]:
                console.print(_transition_line(transition), no_wrap=True, overflow="ellipsis")
            self.transitions_shown = len(item.transitions)
        if item.run and item.run != self.run:
            self.run = item.run
            self._say(f"run {item.run.rsplit('/', 1)[-1]}")
            if self.logs:
                self.log = _RunLog(self.client, item.run, after=self.log)
        self._notice_waiting(item)
        if self.status is not None:
            self.status.update(f"{styled_item_state(item.state)}, attempt {item.attempt} ...")

    def _notice_waiting(self, item: Item) -> None:
        reason = self._pending_reason(item) if item.state is ItemState.PENDING else None
        if reason is not self.waiting_for and reason in WAITING_NOTICES:
            queue = item.queue.rsplit("/", 1)[-1]
            self._say(WAITING_NOTICES[reason].format(queue=queue), notice=True)
        self.waiting_for = reason

    def _pending_reason(self, item: Item) -> PendingReason | None:
        """Why the item waits; asked of its queue, once, when the queue service does not say (older ones)."""
        if item.pending_reason is not None or self.asked_queue:
            return item.pending_reason
        self.asked_queue = True
        queue = self.client.get_queue(item.queue)
        if queue.paused:
            return PendingReason.QUEUE_PAUSED
        return PendingReason.NO_AGENT if queue.agent_count == 0 else None

    def _say(self, line: str, *, notice: bool = False) -> None:
        if not self.quiet:
            console.print(line, no_wrap=True, overflow="ellipsis", markup=False)
        elif notice:
            _warn(line)

    def finish_logs(self) -> None:
        """Let the last run's log reach its end (its run ends about when the item does)."""
        if self.log is None:
            return
        ended = self.log.finish(LOG_DRAIN_SECONDS)
        if self.log.error is not None or not ended:
            problem = f": {one_line(self.log.error)}" if self.log.error else ""
            _warn(f"the log may be incomplete{problem} (takeoff logs {self.run.rsplit('/', 1)[-1]})")


class _RunLog:
    """Prints one run's log as it grows, on a thread of its own beside the item's changes, after the
    previous attempt's. The agent creates the run soon after it takes the item: until then there is none."""

    def __init__(self, client: Client, run: str, after: _RunLog | None) -> None:
        self.client = client
        self.run = run
        self.error: TakeoffError | None = None
        self._next_index = 0
        self._attempt_over = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(after,), name=f"log of {run}", daemon=True)
        self._thread.start()

    def finish(self, timeout: float | None = None) -> bool:
        """Once the attempt is over: wait until the log has ended, then print what its agent sent after the
        run had ended (the output a job prints as it finishes its run); whether the log has ended."""
        self._attempt_over.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self.error is None:
            self._print(follow=False)
        return True

    def _follow(self, after: _RunLog | None) -> None:
        if after is not None:
            after.finish()
        while not self._print(follow=True):
            self._attempt_over.wait(RUN_POLL_SECONDS)

    def _print(self, *, follow: bool) -> bool:
        """Print the log from where it was left; False while the run does not exist yet and the attempt
        goes on (a run that never came is the item's to explain)."""
        last_try = self._attempt_over.is_set()
        try:
            for line in self.client.read_logs(self.run, start_index=self._next_index, follow=follow):
                console.print(log_line_text(line), markup=False, highlight=False, soft_wrap=True)
                self._next_index = line.index + 1
        except NotFoundError:
            return last_try
        except TakeoffError as error:
            self.error = error
        return True


def _warn(message: str) -> None:
    error_console.print(Text.assemble(("warning:", "bold yellow"), " ", message), soft_wrap=True)


def _transition_line(transition: ItemTransition) -> str:
    change = styled_item_state(transition.to_state)
    if transition.from_state:
        change = f"{styled_item_state(transition.from_state)} → {change}"
    parts = [
        transition.time.astimezone().strftime("%H:%M:%S") if transition.time else "",
        change,
        f"attempt {transition.attempt}" if transition.attempt > 1 else "",
        transition.actor and f"by {transition.actor}",
        transition.reason or "",
        escape(transition.message),
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
        text += f"\nits log: takeoff logs {item.run.rsplit('/', 1)[-1]}"
    return text


def _why(item: Item) -> str:
    """A short note on an item's state for a table: a pending one's place and reason, how one ended."""
    if item.state is ItemState.PENDING:
        place = f"#{item.position} " if item.position else ""
        return place + (PENDING_WORDS[item.pending_reason] if item.pending_reason else "")
    if item.cancel_requested and not item.ended:
        return "cancel requested"
    return str(item.reason or "")


def _pending_text(item: Item) -> str:
    assert item.pending_reason is not None
    words = PENDING_WORDS[item.pending_reason]
    return f"{words}: {item.pending_detail}" if item.pending_detail else words


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
    if item.state is ItemState.PENDING and item.position:
        table.add_row("position", f"#{item.position} in queue {item.queue.rsplit('/', 1)[-1]} (#1 is next)")
    if item.pending_reason is not None:
        table.add_row("waiting", escape(_pending_text(item)))
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
