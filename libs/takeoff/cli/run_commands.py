"""``takeoff runs list|show`` and ``takeoff logs``: what runs did, from the registry."""

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

from takeoff.cli._output import console, fail, print_json
from takeoff.cli._registry import (
    JsonOption,
    ProjectOption,
    duration,
    styled_state,
    takeoff_client,
    version_ref,
    when,
)
from takeoff.models import LogStream, MetricRow, RunInfo, RunState

runs_app = typer.Typer(help="List runs and show what they reported.", no_args_is_help=True)

RunArgument = Annotated[str, typer.Argument(help="Run id or resource name.", show_default=False)]
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40


@runs_app.command("list")
def list_runs(
    project: ProjectOption = None,
    job: Annotated[str, typer.Option(help="Only runs of this job (JOB, JOB:vN or JOB:ALIAS).")] = "",
    state: Annotated[
        list[str] | None, typer.Option(help="Only runs in this state, e.g. running (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List the runs of a project, newest first."""
    states = [_run_state(name) for name in state or []]
    with takeoff_client(project) as client:
        runs = list(itertools.islice(client.list_runs(job=job, states=states), limit))
        if json_output:
            print_json(runs)
            return
        table = Table(title=f"runs in {client.project}", title_justify="left")
        for column in ("run", "name", "state", "job", "created", "duration", "rows"):
            table.add_column(column, justify="right" if column == "rows" else "left")
        for run in runs:
            table.add_row(
                run.id,
                run.display_name,
                styled_state(run.state),
                version_ref(run.job_version),
                when(run.create_time),
                duration(run.start_time, run.end_time),
                str(run.history_length),
            )
        console.print(table if runs else f"no runs in project {client.project}")


@runs_app.command("show")
def show(run: RunArgument, project: ProjectOption = None, json_output: JsonOption = False) -> None:
    """Show a run: its state, config, summary and a compact view of each metric."""
    with takeoff_client(project) as client:
        info = client.get_run(run)
        metrics = _metric_series(client.read_metrics(info.name))
    if json_output:
        print_json({"run": info, "metrics": {key: series.overview() for key, series in metrics.items()}})
        return
    console.print(_overview(info))
    if info.config:
        console.print(_key_values("config", info.config))
    if info.summary:
        console.print(_key_values("summary", info.summary))
    console.print(_metrics_table(metrics) if metrics else "no metrics logged")


def logs(
    run: RunArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")
    ] = False,
    tail: Annotated[int, typer.Option(help="Start with the last N lines.")] = 0,
    project: ProjectOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
) -> None:
    """Print a run's log: what the job printed, its build output and Takeoff's own messages."""
    with takeoff_client(project) as client:
        try:
            for line in client.read_logs(run, tail=tail, follow=follow):
                if json_output:
                    text = json.dumps({"index": line.index, "stream": line.stream, "text": line.text})
                elif line.stream in (LogStream.STDOUT, LogStream.STDERR):
                    text = line.text
                else:
                    text = f"[{line.stream.lower()}] {line.text}"
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


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


def _sparkline(values: list[float], width: int) -> str:
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return ""
    size = math.ceil(len(finite) / width)
    buckets = [sum(finite[i : i + size]) / len(finite[i : i + size]) for i in range(0, len(finite), size)]
    low, high = min(buckets), max(buckets)
    if high == low:
        return SPARK_LEVELS[len(SPARK_LEVELS) // 2] * len(buckets)
    top = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[round((value - low) / (high - low) * top)] for value in buckets)


def _metrics_table(metrics: dict[str, _Series]) -> Table:
    table = Table(title="metrics", title_justify="left")
    for column in ("key", "rows", "last", "min", "max"):
        table.add_column(column, justify="left" if column == "key" else "right")
    table.add_column("history", no_wrap=True)
    # What the other columns leave of the terminal: about 4 x 12 for the numbers, plus borders.
    width = max(8, min(SPARK_WIDTH, console.width - 60 - max(len(key) for key in metrics)))
    for key, series in metrics.items():
        overview = series.overview()
        table.add_row(
            key,
            str(overview["count"]),
            _number(overview["last"]),
            _number(overview["min"]),
            _number(overview["max"]),
            _sparkline(series.values, width),
        )
    return table


def _overview(info: RunInfo) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("run", f"{info.id}  {info.display_name}".rstrip())
    table.add_row("state", styled_state(info.state))
    if info.job_version:
        table.add_row("job", f"{version_ref(info.job_version)}  ({info.job_version})")
    if info.queue_item:
        table.add_row("item", f"{info.queue_item} (attempt {info.attempt})")
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
    return table


def _key_values(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in sorted(values.items()):
        table.add_row(key, _number(value) if isinstance(value, float) else json.dumps(value))
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _run_state(name: str) -> RunState:
    try:
        return RunState(name.upper())
    except ValueError:
        fail(f"unknown run state {name!r}; one of: {', '.join(state.lower() for state in RunState)}")


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
    app.command()(logs)
