"""``takeoff runs list|show|attempts`` and ``takeoff logs``: what runs did, from the registry. A run is named
by its id, a unique prefix of it, its resource name, or the queue item it ran for (its latest attempt's
run)."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.table import Table

from takeoff.cli._output import (
    FREE_TEXT_WIDTH,
    Column,
    Listing,
    WideOption,
    console,
    fail,
    print_json,
    short_id,
    short_time,
    usage_error,
)
from takeoff.cli._registry import (
    JsonOption,
    ProjectOption,
    duration,
    human_bytes,
    log_line_json,
    log_line_text,
    styled_state,
    takeoff_client,
    version_ref,
    when,
)
from takeoff.client import Client
from takeoff.errors import NotFoundError, TakeoffError
from takeoff.models import ArtifactVersion, MetricRow, RunInfo, RunState

runs_app = typer.Typer(help="List runs and show what they reported.", no_args_is_help=True)

RunArgument = Annotated[
    str,
    typer.Argument(
        help="Run: its id, a unique prefix of it (as `runs list` shows), its resource name, or a queue"
        " item (ITEM_ID or QUEUE/ITEM_ID) for the run of its latest attempt.",
        metavar="RUN",
        show_default=False,
    ),
]
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40
RUN_COLUMNS = (
    Column("run"),
    Column("name", free_text=True),
    Column("state"),
    Column("job", free_text=True),
    Column("created"),
    Column("duration", justify="right"),
    Column("rows", justify="right", wide_only=True),
    Column("group", free_text=True, wide_only=True),
    Column("tags", free_text=True, wide_only=True),
)


@runs_app.command("list")
def list_runs(
    *,
    project: ProjectOption = None,
    job: Annotated[str, typer.Option(help="Only runs of this job (JOB, JOB:vN or JOB:ALIAS).")] = "",
    state: Annotated[
        list[str] | None,
        typer.Option(help="Only runs in this state, e.g. running (repeatable).", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs, newest first.")] = 50,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """List the runs of a project, newest first."""
    states = [_run_state(name) for name in state or []]
    with takeoff_client(project) as client:
        runs = list(itertools.islice(client.list_runs(job=job, states=states), limit))
        if json_output:
            print_json(runs)
            return
        if not runs:
            console.print(f"no runs in project {client.project}")
            return
        listing = Listing(RUN_COLUMNS, wide=wide, title=f"runs in {client.project}")
        for run in runs:
            listing.add_row(
                short_id(run.id, wide),
                run.display_name,
                styled_state(run.state),
                version_ref(run.job_version),
                short_time(run.create_time, wide),
                duration(run.start_time, run.end_time),
                str(run.history_length),
                run.group,
                ", ".join(run.tags),
            )
        listing.print()


@runs_app.command("show")
def show(
    run: RunArgument, project: ProjectOption = None, wide: WideOption = False, json_output: JsonOption = False
) -> None:
    """Show a run: its state, the run it resumed, config, summary, a compact view of each metric, and the
    artifact versions it logged and used."""
    with takeoff_client(project) as client:
        info = find_run(client, run)
        metrics = _metric_series(client.read_metrics(info.name))
        logged, used = _lineage(client, info)
    if json_output:
        print_json(
            {
                "run": info,
                "metrics": {key: series.overview() for key, series in metrics.items()},
                "artifacts": {"logged": logged, "used": used},
            }
        )
        return
    console.print(_overview(info))
    for title, values in (("config", info.config), ("summary", info.summary)):
        if values:
            _key_values(title, values).print()
    if metrics:
        _metrics_listing(metrics, wide).print()
    else:
        console.print("no metrics logged")
    if logged or used:
        _artifacts_listing(logged, used, wide).print()


@runs_app.command("attempts")
def attempts(
    run: RunArgument,
    project: ProjectOption = None,
    key: Annotated[
        str, typer.Option(help="Draw this metric across the attempts, one segment each.", metavar="METRIC")
    ] = "",
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show a run and the runs it resumed, back to the first attempt, as segments of one line: each
    attempt's run with the steps it logged (and, with --key, the metric drawn across them)."""
    with takeoff_client(project) as client:
        chain = [find_run(client, run)]
        while chain[0].resumed_from and len(chain) < MAX_ATTEMPTS_SHOWN:
            chain.insert(0, client.get_run(chain[0].resumed_from))
        first_steps = [_first_step(client, info) for info in chain]
        series = [_values_of(client, info, key) for info in chain] if key else []
    if json_output:
        print_json(
            [
                {
                    "run": info.name,
                    "attempt": info.attempt,
                    "state": info.state,
                    "first_step": first,
                    "last_step": info.last_step if info.history_length else None,
                    "rows": info.history_length,
                    "resumed_from": info.resumed_from,
                    **({"values": values} if key else {}),
                }
                for info, first, values in itertools.zip_longest(chain, first_steps, series)
            ]
        )
        return
    listing = Listing(
        [
            Column("attempt", justify="right"),
            Column("run"),
            Column("state"),
            Column("steps", justify="right"),
            Column("rows", justify="right"),
            Column("resumed from"),
        ],
        wide=wide,
        title=f"attempts of {chain[-1].queue_item.rsplit('/', 1)[-1]}" if chain[-1].queue_item else None,
    )
    for info, first in zip(chain, first_steps, strict=True):
        listing.add_row(
            str(info.attempt or "-"),
            short_id(info.id, wide),
            styled_state(info.state),
            "-" if first is None else f"{first}-{info.last_step}",
            str(info.history_length),
            short_id(info.resumed_from.rsplit("/", 1)[-1], wide) if info.resumed_from else "-",
        )
    listing.print()
    if key:
        console.print(f"{key}  {_segments(series, SPARK_WIDTH)}", highlight=False)


def logs(
    run: RunArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")
    ] = False,
    tail: Annotated[int, typer.Option(help="Start with the last N lines.")] = 0,
    project: ProjectOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per line, with its time (and rank).")
    ] = False,
) -> None:
    """Print a run's log: what the job printed as it is, its build output (lines marked \\[build]) and
    Takeoff's own messages (\\[takeoff]). In a multi-node launch each line of the job says which rank
    printed it (\\[rank 1])."""
    with takeoff_client(project) as client:
        name = find_run(client, run).name
        try:
            for line in client.read_logs(name, tail=tail, follow=follow):
                sys.stdout.write((log_line_json(line) if json_output else log_line_text(line)) + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _lineage(client: Client, info: RunInfo) -> tuple[list[ArtifactVersion], list[ArtifactVersion]]:
    """The artifact versions a run logged and used; none from a registry older than artifacts."""
    try:
        logged = list(client.list_artifact_versions(project=info.project, logged_by=info.name))
        used = list(client.list_artifact_versions(project=info.project, used_by=info.name))
    except TakeoffError as error:
        if error.code != "UNIMPLEMENTED":
            raise
        return [], []
    return logged, used


MAX_ATTEMPTS_SHOWN = 100
"""How far back ``runs attempts`` follows ``resumed_from``: more than any queue's ``max_attempts``."""


def _first_step(client: Client, info: RunInfo) -> int | None:
    """The step of a run's first row (the stream is closed after it)."""
    rows = client.read_metrics(info.name)
    try:
        return next(iter(rows)).step
    except StopIteration:
        return None


def _values_of(client: Client, info: RunInfo, key: str) -> list[float]:
    """The numeric values of ``key`` a run logged, downsampled for a line of a terminal's width."""
    rows = client.read_metrics(info.name, keys=[key], max_points=SPARK_WIDTH * 4)
    return [row.values[key] for row in rows if key in row.values]


def _segments(series: list[list[float]], width: int) -> str:
    """Each attempt's values as one segment of a line scaled alike, a width by its number of values,
    segments apart by ``│``; an attempt without values is ``·``."""
    finite = [value for values in series for value in values if math.isfinite(value)]
    total = sum(len(values) for values in series) or 1
    return "│".join(
        _sparkline(values, max(1, round(width * len(values) / total)), min(finite), max(finite))
        if values and finite
        else "·"
        for values in series
    )


def find_run(client: Client, reference: str) -> RunInfo:
    """The run a reference names (see RunArgument); an item's is the run of its latest attempt."""
    if _names_an_item(reference):
        return _run_of_item(client, reference)
    try:
        return client.get_run(reference)
    except NotFoundError as run_missing:
        if run_missing.reason != "RUN_NOT_FOUND":
            raise
        try:
            return _run_of_item(client, reference)
        except TakeoffError:  # no item either (or no queue service to ask): the run is what was meant
            raise run_missing from None


def _names_an_item(reference: str) -> bool:
    """``QUEUE/ITEM_ID`` or an item's resource name: never a run's."""
    return "/items/" in reference or ("/" in reference and not reference.startswith("projects/"))


def _run_of_item(client: Client, reference: str) -> RunInfo:
    item = client.get_item(reference)
    if not item.run:
        fail(f"item {item.id} has no run yet: it is {item.state} (see `takeoff items describe {item.id}`)")
    return client.get_run(item.run)


@dataclass
class _Series:
    """The numeric values one metric key took, in history order."""

    values: list[float] = field(default_factory=list)

    def overview(self) -> dict[str, Any]:
        finite = [value for value in self.values if math.isfinite(value)]
        return {
            "count": len(self.values),
            "last": self.values[-1],
            "min": min(finite, default=None),
            "max": max(finite, default=None),
        }


def _metric_series(rows: Iterable[MetricRow]) -> dict[str, _Series]:
    series: dict[str, _Series] = {}
    for row in rows:
        for key, value in row.values.items():
            series.setdefault(key, _Series()).values.append(value)
    return dict(sorted(series.items()))


def _sparkline(values: list[float], width: int, low: float | None = None, high: float | None = None) -> str:
    """Values as a line of block characters at most ``width`` long, each the mean of its share of the
    values; scaled between ``low`` and ``high`` (default: the line's own extremes)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return ""
    size = math.ceil(len(finite) / width)
    buckets = [sum(finite[i : i + size]) / len(finite[i : i + size]) for i in range(0, len(finite), size)]
    low = min(buckets) if low is None else low
    high = max(buckets) if high is None else high
    if high == low:
        return SPARK_LEVELS[len(SPARK_LEVELS) // 2] * len(buckets)
    top = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[round((value - low) / (high - low) * top)] for value in buckets)


def _metrics_listing(metrics: dict[str, _Series], wide: bool) -> Listing:
    rows = []
    for key, series in metrics.items():
        overview = series.overview()
        numbers = (overview["last"], overview["min"], overview["max"])
        rows.append((key, str(overview["count"]), *(_number(number) for number in numbers)))
    # The history takes what the other columns leave of the terminal, a gap of 3 each.
    others = min(max(len(row[0]) for row in rows), FREE_TEXT_WIDTH) + sum(
        max(len(header), *(len(row[index]) for row in rows)) + 3
        for index, header in enumerate(("rows", "last", "min", "max"), start=1)
    )
    width = SPARK_WIDTH if wide else max(8, min(SPARK_WIDTH, console.width - others - 5))
    columns = [Column("key", free_text=True)]
    columns += [Column(header, justify="right") for header in ("rows", "last", "min", "max")]
    listing = Listing([*columns, Column("history")], wide=wide, title="metrics")
    for row, series in zip(rows, metrics.values(), strict=True):
        listing.add_row(*row, _sparkline(series.values, width))
    return listing


def _overview(info: RunInfo) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("run", f"{info.id}  {info.display_name}".rstrip())
    table.add_row("state", styled_state(info.state))
    for label, text in (("group", info.group), ("job type", info.job_type), ("tags", ", ".join(info.tags))):
        if text:
            table.add_row(label, text)
    if info.job_version:
        table.add_row("job", f"{version_ref(info.job_version)}  ({info.job_version})")
    if info.queue_item:
        table.add_row("item", f"{info.queue_item} (attempt {info.attempt})")
    if info.resumed_from:
        table.add_row("resumed from", f"{info.resumed_from.rsplit('/', 1)[-1]}  (`takeoff runs attempts`)")
    table.add_row("created", when(info.create_time))
    table.add_row("started", when(info.start_time))
    table.add_row("ended", when(info.end_time))
    table.add_row("duration", duration(info.start_time, info.end_time))
    if info.exit_code is not None:
        table.add_row("exit code", str(info.exit_code))
    if info.message:
        table.add_row("message", info.message)
    table.add_row("history", f"{info.history_length} rows, last step {info.last_step}")
    table.add_row("log", f"{info.log_line_count} lines")
    if info.notes:
        table.add_row("notes", info.notes)
    return table


def _artifacts_listing(logged: list[ArtifactVersion], used: list[ArtifactVersion], wide: bool) -> Listing:
    """The artifact versions a run logged and used: its lineage both ways."""
    listing = Listing(
        [
            Column("", free_text=False),
            Column("version"),
            Column("type"),
            Column("size", justify="right"),
            Column("aliases", free_text=True),
            Column("logged by"),
        ],
        wide=wide,
        title="artifacts",
    )
    for direction, versions in (("logged", logged), ("used", used)):
        for version in versions:
            listing.add_row(
                direction,
                version.ref,
                version.type,
                human_bytes(version.size_bytes),
                ", ".join(version.aliases),
                short_id(version.run.rsplit("/", 1)[-1], wide) if version.run else "-",
            )
    return listing


def _key_values(title: str, values: dict[str, Any]) -> Listing:
    listing = Listing(
        [Column("key", free_text=True), Column("value", free_text=True)], wide=False, title=title
    )
    for key, value in sorted(values.items()):
        listing.add_row(key, _number(value) if isinstance(value, float) else json.dumps(value))
    return listing


def _number(value: float | None) -> str:
    """A metric value: whole numbers as integers (``5``, not ``5.0`` or ``1e+06``), others to 6 digits."""
    if value is None:
        return "-"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return f"{value:.6g}"


def _run_state(name: str) -> RunState:
    try:
        return RunState(name.upper())
    except ValueError:
        usage_error(f"unknown run state {name!r}; one of: {', '.join(state.lower() for state in RunState)}")


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
    app.command()(logs)
