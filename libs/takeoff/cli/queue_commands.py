"""``takeoff queue create|list|describe|update|pause|resume|delete``, ``takeoff agents``, and the timeline
``takeoff items describe ITEM --trace`` prints."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from takeoff.cli._output import (
    Column,
    Listing,
    WideOption,
    confirm_deletion,
    console,
    print_json,
    usage_error,
)
from takeoff.cli._queue import agents_listing, key_values, parse_span, show_span, styled_item_state
from takeoff.cli._registry import (
    JsonOption,
    ProjectOption,
    SecretOption,
    read_json_object,
    takeoff_client,
    when,
)
from takeoff.models import Item, ItemState, Queue, ResourceKind, SecretMount

queue_app = typer.Typer(help="Create, inspect and change queues.", no_args_is_help=True)

QueueArgument = Annotated[
    str, typer.Argument(help="Queue id or resource name.", metavar="QUEUE", show_default=False)
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Default resource config of the items (a JSON or YAML file); may use {{VAR}} holes.",
        exists=True,
        dir_okay=False,
        readable=True,
        show_default=False,
    ),
]
VarOption = Annotated[
    list[str] | None,
    typer.Option(
        "--var",
        metavar="NAME=SCHEMA",
        help="Template variable NAME=SCHEMA: a JSON Schema, e.g. "
        '\'cpu={"type": "integer", "minimum": 1, "default": 2, "description": "CPUs"}\', '
        "or just a type, e.g. gpus=integer (repeatable).",
        show_default=False,
    ),
]
ContainerOption = Annotated[
    str | None,
    typer.Option(
        "--container",
        metavar="NAME",
        help="kubernetes: the manifest's container that runs the job (default: the first).",
        show_default=False,
    ),
]
QUEUE_COLUMNS = (
    Column("queue"),
    Column("resource"),
    Column("status"),
    Column("pending", justify="right"),
    Column("active", justify="right"),
    Column("agents", justify="right"),
    Column("succeeded", justify="right", wide_only=True),
    Column("failed", justify="right", wide_only=True),
    Column("description", free_text=True, wide_only=True),
)


def _span_option(help_text: str) -> Any:
    return typer.Option(parser=parse_span, metavar="SPAN", help=help_text, show_default=False)


@queue_app.command("create")
def create(
    *,
    name: QueueArgument,
    resource: Annotated[
        ResourceKind,
        typer.Option(help="What the items run on (their resource configs: see above).", case_sensitive=False),
    ] = ResourceKind.LOCAL_PROCESS,
    config: ConfigOption = None,
    var: VarOption = None,
    prioritize: Annotated[
        bool, typer.Option(help="Serve higher priorities first (default: first in, first out).")
    ] = False,
    max_attempts: Annotated[int, typer.Option(help="Attempts per item, the first included (0: 3).")] = 0,
    concurrency: Annotated[int, typer.Option(help="Most items running at once (0: no limit).")] = 0,
    start_timeout: Annotated[
        timedelta | None,
        _span_option("Time an item may take to start running, e.g. 10m (default: 30m; slurm: no limit)."),
    ] = None,
    max_run_time: Annotated[
        timedelta | None, _span_option("Time an item may run, e.g. 2h or 1h30m (default: no limit).")
    ] = None,
    retry_job_failures: Annotated[
        bool, typer.Option(help="Also retry items whose job failed (default: infrastructure failures only).")
    ] = False,
    retry_delay: Annotated[
        timedelta | None, _span_option("Wait before a retried item may run again, e.g. 10s.")
    ] = None,
    paused: Annotated[
        bool, typer.Option(help="Create it paused: it takes launches, assigns nothing.")
    ] = False,
    description: Annotated[str, typer.Option(help="What the queue is for.")] = "",
    container: ContainerOption = None,
    secure: Annotated[
        bool,
        typer.Option(
            help="Refuse launches that override the entrypoint or dangerous resource options"
            " (privileged, host network, host paths, ...), each by name."
        ),
    ] = False,
    allow_host_paths: Annotated[
        bool, typer.Option(help="Let the queue's own --config mount host paths.")
    ] = False,
    secret: SecretOption = None,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a queue of work for one kind of resource.

    --config is the resource config every item gets (a launch's --resource-config merges
    over it). What each --resource takes:

    local-process: env; nodes.
    local-container: docker options (gpus, cpus, mem_limit, shm_size, env, volumes, ...); nodes.
    kubernetes: a batch/v1 Job manifest; nodes beside it.
    slurm: partition, nodes, ntasks_per_node, gpus_per_node, cpus_per_task, mem (MB, or 16G),
    time (minutes, or D-HH:MM:SS), account, qos, constraint, env, and sbatch: more sbatch
    options from an allow-list (gres, exclusive, nodelist, mail_type, ...). The agent runs on a
    login node; a slurm queue waits for a start without limit unless --start-timeout.
    ray: entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory (bytes),
    entrypoint_resources, env.

    nodes: N launches N ranks (slurm: N nodes of ntasks_per_node ranks; local-process: N
    processes; local-container: N containers sharing rank 0's network; kubernetes: an Indexed
    Job of N pods). Each rank gets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK,
    NODE_RANK and LOCAL_WORLD_SIZE; rank 0 writes the run, and `takeoff logs` labels each
    line with its rank.
    """
    with takeoff_client(project) as client:
        queue = client.create_queue(
            name,
            resource=resource,
            resource_config=read_json_object(config),
            template_variables=_template_variables(var),
            prioritization=prioritize,
            max_attempts=max_attempts,
            retry_job_failures=retry_job_failures,
            retry_delay=retry_delay,
            start_timeout=start_timeout,
            max_run_time=max_run_time,
            concurrency_limit=concurrency,
            paused=paused,
            description=description,
            container_name=container or "",
            secure=secure,
            allow_host_paths=allow_host_paths,
            secrets=secret or (),
        )
    if json_output:
        print_json(queue)
    else:
        console.print(f"[green]created[/] queue {queue.id} for {queue.resource}  ({queue.name})")


@queue_app.command("list")
def list_queues(
    project: ProjectOption = None, wide: WideOption = False, json_output: JsonOption = False
) -> None:
    """List the queues of a project with their items and agents (--wide: also ended items)."""
    with takeoff_client(project) as client:
        queues = list(client.list_queues())
        if json_output:
            print_json(queues)
            return
        if not queues:
            console.print(f"no queues in project {client.project}")
            return
        listing = Listing(QUEUE_COLUMNS, wide=wide, title=f"queues in {client.project}")
        for queue in queues:
            counts = queue.item_counts
            listing.add_row(
                queue.id,
                queue.resource,
                _status(queue),
                str(counts[ItemState.PENDING]),
                str(sum(count for state, count in counts.items() if state.live)),
                str(queue.agent_count),
                str(counts[ItemState.SUCCEEDED]),
                str(counts[ItemState.FAILED]),
                queue.description,
            )
        listing.print()


@queue_app.command("describe")
def describe(
    name: QueueArgument,
    project: ProjectOption = None,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show a queue: its settings, template variables, items by state and the agents serving it."""
    with takeoff_client(project) as client:
        queue = client.get_queue(name)
        agents = list(client.list_agents(queue=queue.name))
    if json_output:
        print_json({"queue": queue, "agents": agents})
        return
    console.print(_settings(queue))
    if queue.template_variables:
        _variables_listing(queue).print()
    if agents:
        agents_listing(agents, "agents", wide).print()
    else:
        console.print("no agents serve this queue")


@queue_app.command("update")
def update(
    *,
    name: QueueArgument,
    config: ConfigOption = None,
    var: Annotated[
        list[str] | None,
        typer.Option(
            "--var",
            metavar="NAME=SCHEMA",
            help="Template variable NAME=SCHEMA as for create; replaces them all.",
            show_default=False,
        ),
    ] = None,
    prioritize: Annotated[
        bool | None, typer.Option("--prioritize/--no-prioritize", help="Serve higher priorities first.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts per item (0: 3).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Most items running at once (0: no limit).")] = None,
    start_timeout: Annotated[
        timedelta | None, _span_option("Time an item may take to start running, e.g. 10m.")
    ] = None,
    max_run_time: Annotated[
        timedelta | None, _span_option("Time an item may run, e.g. 2h (0: no limit).")
    ] = None,
    retry_job_failures: Annotated[
        bool | None,
        typer.Option(
            "--retry-job-failures/--no-retry-job-failures", help="Also retry items whose job failed."
        ),
    ] = None,
    retry_delay: Annotated[
        timedelta | None, _span_option("Wait before a retried item may run again, e.g. 10s.")
    ] = None,
    description: Annotated[str | None, typer.Option(help="What the queue is for.")] = None,
    container: ContainerOption = None,
    secure: Annotated[
        bool | None,
        typer.Option("--secure/--no-secure", help="Refuse launches overriding dangerous options."),
    ] = None,
    allow_host_paths: Annotated[
        bool | None,
        typer.Option(
            "--allow-host-paths/--no-allow-host-paths", help="Let the queue's config mount host paths."
        ),
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            metavar="SECRET=ENV|SECRET:file=NAME",
            help="A secret every job gets, as for create; replaces them all.",
            show_default=False,
        ),
    ] = None,
    no_secrets: Annotated[bool, typer.Option("--no-secrets", help="Give jobs no secrets any more.")] = False,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change some of a queue's settings; the others stay as they are.

    Priorities, concurrency, start timeout and retries apply at once, also to
    waiting items; the resource config, template variables, attempts and max
    run time apply to items launched afterwards.
    """
    given = {
        "resource_config": read_json_object(config),
        "template_variables": _template_variables(var),
        "prioritization": prioritize,
        "max_attempts": max_attempts,
        "concurrency_limit": concurrency,
        "start_timeout": start_timeout,
        "max_run_time": max_run_time,
        "retry_job_failures": retry_job_failures,
        "retry_delay": retry_delay,
        "description": description,
        "container_name": container,
        "secure": secure,
        "allow_host_paths": allow_host_paths,
        "secrets": [] if no_secrets else _mounts(secret),
    }
    if no_secrets and secret:
        usage_error("give --secret or --no-secrets, not both")
    changes: dict[str, Any] = {setting: value for setting, value in given.items() if value is not None}
    if not changes:
        usage_error("nothing to change: give at least one setting (see --help)")
    with takeoff_client(project) as client:
        queue = client.update_queue(name, **changes)
    if json_output:
        print_json(queue)
    else:
        console.print(f"[green]updated[/] queue {queue.id}: {', '.join(sorted(changes))}")


@queue_app.command("pause")
def pause(name: QueueArgument, project: ProjectOption = None, json_output: JsonOption = False) -> None:
    """Stop assigning the queue's items; it still takes launches, and running items carry on."""
    with takeoff_client(project) as client:
        queue = client.pause_queue(name)
    if json_output:
        print_json(queue)
    else:
        console.print(f"[yellow]paused[/] queue {queue.id}: it takes launches but assigns nothing")


@queue_app.command("resume")
def resume(name: QueueArgument, project: ProjectOption = None, json_output: JsonOption = False) -> None:
    """Assign the queue's items again."""
    with takeoff_client(project) as client:
        queue = client.resume_queue(name)
    if json_output:
        print_json(queue)
    else:
        console.print(f"[green]resumed[/] queue {queue.id}")


@queue_app.command("delete")
def delete(
    name: QueueArgument,
    force: Annotated[
        bool, typer.Option(help="Delete it even with items not yet ended; running ones are stopped.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Delete without asking first (for scripts).")
    ] = False,
    project: ProjectOption = None,
) -> None:
    """Delete a queue and its items; asks first unless --yes."""
    with takeoff_client(project) as client:
        queue = client.get_queue(name)
        if not yes:
            confirm_deletion(_contents(queue, force))
        client.delete_queue(queue.name, force=force)
    console.print(f"deleted queue {queue.id}")


def _contents(queue: Queue, force: bool) -> str:
    """``queue cpu and its 12 items, stopping 2 not ended``."""
    items = sum(queue.item_counts.values())
    live = sum(count for state, count in queue.item_counts.items() if state.live)
    stopping = f", stopping {live} not ended" if force and live else ""
    return f"queue {queue.id} and its {items} item(s){stopping}"


def agents(
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue", "-q", help="Only agents serving this queue.", metavar="QUEUE", show_default=False
        ),
    ] = None,
    all_agents: Annotated[
        bool, typer.Option("--all", help="Also agents that disconnected but still hold leases.")
    ] = False,
    project: ProjectOption = None,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """List the agents connected to the queue service: what they serve and hold."""
    with takeoff_client(project) as client:
        found = list(client.list_agents(queue=queue, include_disconnected=all_agents))
    if json_output:
        print_json(found)
        return
    if found:
        agents_listing(found, "agents", wide).print()
    else:
        console.print("no agents connected")


def _template_variables(specs: list[str] | None) -> dict[str, dict[str, Any]] | None:
    """``NAME=SCHEMA`` options as schemas, a bare type name standing for ``{"type": NAME}``."""
    if specs is None:
        return None
    return {
        name: schema if isinstance(schema, dict) else {"type": schema}
        for name, schema in key_values(specs, "--var").items()
    }


def _mounts(specs: list[str] | None) -> list[SecretMount] | None:
    if specs is None:
        return None
    try:
        return [SecretMount.parse(spec) for spec in specs]
    except ValueError as error:
        usage_error(f"--secret {error}")


def _status(queue: Queue) -> str:
    return "[yellow]paused[/]" if queue.paused else "[green]active[/]"


def _settings(queue: Queue) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("queue", f"{queue.id}  ({queue.name})")
    table.add_row("resource", str(queue.resource))
    table.add_row("status", _status(queue))
    if queue.description:
        table.add_row("description", queue.description)
    table.add_row("order", "priority, then first in" if queue.prioritization else "first in, first out")
    table.add_row("concurrency", str(queue.concurrency_limit or "no limit"))
    retried = "all failures" if queue.retry_job_failures else "infrastructure failures"
    if queue.retry_delay:
        retried += f", after {show_span(queue.retry_delay)}"
    table.add_row("attempts", f"{queue.max_attempts}, retrying {retried}")
    table.add_row("start timeout", show_span(queue.start_timeout))
    table.add_row("max run time", show_span(queue.max_run_time, unset="no limit"))
    if queue.container_name:
        table.add_row("container", queue.container_name)
    guarded = "secure: dangerous overrides refused" if queue.secure else "not secure: items may override"
    table.add_row("security", guarded + (", host paths allowed" if queue.allow_host_paths else ""))
    if queue.secrets:
        table.add_row("secrets", "\n".join(str(mount) for mount in queue.secrets))
    table.add_row("resource config", json.dumps(queue.resource_config, indent=2, sort_keys=True))
    counts = [f"{count} {styled_item_state(state)}" for state, count in queue.item_counts.items() if count]
    table.add_row("items", ", ".join(counts) or "none")
    table.add_row("created", when(queue.create_time))
    table.add_row("updated", when(queue.update_time))
    return table


def _variables_listing(queue: Queue) -> Listing:
    columns = [Column("name"), *(Column(header, free_text=True) for header in ("type", "default", "allowed"))]
    listing = Listing(
        [*columns, Column("description", free_text=True)], wide=False, title="template variables"
    )
    for name, variable in queue.template_variables.items():
        schema = variable.schema
        listing.add_row(
            name,
            str(schema.get("type", "")),
            json.dumps(schema["default"]) if "default" in schema else "(required)",
            _allowed(schema),
            variable.description,
        )
    return listing


def _allowed(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return ", ".join(json.dumps(value) for value in schema["enum"])
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is None and high is None:
        return ""
    return f"{'' if low is None else low}..{'' if high is None else high}"


def print_item_trace(item: Item) -> None:
    """The item's timeline from its stored transitions, each with how long the step before it took, then
    its trace id and where its spans are (docs/design.md §9)."""
    console.print(_timeline(item))
    console.print(_trace_hint(item.traceparent))


def _timeline(item: Item) -> Table:
    table = Table(title=f"timeline of {item.name}", title_justify="left")
    for column in ("time", "since enqueue", "took", "state", "attempt", "agent", "detail"):
        table.add_column(
            column, overflow="fold", justify="right" if column in ("since enqueue", "took") else "left"
        )
    start = item.transitions[0].time if item.transitions else None
    previous: datetime | None = None
    for transition in item.transitions:
        moment = transition.time
        detail = " ".join(filter(None, [transition.reason or "", transition.message, transition.actor]))
        table.add_row(
            when(moment),
            _seconds(moment - start) if moment and start else "-",
            _seconds(moment - previous) if moment and previous else "",
            styled_item_state(transition.to_state),
            str(transition.attempt or "-"),
            transition.agent or "-",
            detail,
        )
        previous = moment
    if previous is not None and not item.state.ended:
        table.add_row(
            "now",
            _seconds(datetime.now(UTC) - start) if start else "-",
            _seconds(datetime.now(UTC) - previous),
            "(so far)",
            "",
            "",
            "",
        )
    return table


def _seconds(span: timedelta) -> str:
    """A step's length: milliseconds while they matter, then seconds, then minutes."""
    seconds = span.total_seconds()
    if seconds < 10:
        return f"{seconds:.3f}s"
    if seconds < 600:
        return f"{seconds:.1f}s"
    return show_span(timedelta(seconds=round(seconds)))


def _trace_hint(traceparent: str) -> str:
    parts = traceparent.split("-")
    if len(parts) != 4:
        return "no trace: the queue service recorded no trace context for this item"
    trace_id = parts[1]
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint:
        return (
            f"trace {trace_id}: set OTEL_TRACES_EXPORTER=otlp and OTEL_EXPORTER_OTLP_ENDPOINT for the "
            "services and agents to export their spans, then look the trace up by its id in your tracing "
            "backend"
        )
    return (
        f"trace {trace_id}: the spans of every process it touched (queue, registry, builder, agent, job) "
        f"are exported to {endpoint}; look the trace up there by its id (Jaeger: /trace/{trace_id} in its UI)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue")
    app.command()(agents)
