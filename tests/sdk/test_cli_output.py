"""How ``takeoff`` speaks, run in this process through ``takeoff.cli.main`` (as the console script runs it)
against the session's real registry and queue: tables that fit 80 columns without cutting an id, id
prefixes every command takes, exit codes, value names in help, and deletes that ask first."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from takeoff import Client
from takeoff import __version__ as takeoff_version
from takeoff.cli import main
from takeoff.cli._output import Column, Listing, console, short_time
from takeoff.errors import InvalidArgumentError, NotFoundError
from takeoff.models import dict_to_struct
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.queue.harness import ScriptedAgent, make_code_job

TERMINAL_WIDTH = 80


@dataclass
class Outcome:
    code: int
    out: str
    err: str


Takeoff = Callable[..., Outcome]


@pytest.fixture
def takeoff(
    registry: ServiceProcess,
    queue_service: ServiceProcess,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Takeoff:
    """Run ``takeoff ARGS`` on an 80-column terminal with the session's admin key, stdin as given."""
    for variable in [name for name in os.environ if name.startswith("TAKEOFF_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("TAKEOFF_REGISTRY", registry.address)
    monkeypatch.setenv("TAKEOFF_QUEUE_ADDRESS", queue_service.address)
    monkeypatch.setenv("TAKEOFF_PROJECT", project)
    monkeypatch.setenv("TAKEOFF_API_KEY", ADMIN_KEY)
    monkeypatch.setattr(console, "width", TERMINAL_WIDTH)

    def run(*args: str, stdin: io.StringIO | None = None) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["takeoff", *args])
        monkeypatch.setattr(sys, "stdin", stdin or io.StringIO())
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return Outcome(int(exited.value.code or 0), captured.out, captured.err)

    return run


@pytest.fixture
def client(registry: ServiceProcess, queue_service: ServiceProcess, project: str) -> Iterator[Client]:
    with Client(registry.address, queue=queue_service.address, project=project, api_key=ADMIN_KEY) as client:
        yield client


@pytest.fixture
def runs(registry: ServiceProcess) -> Iterator[runs_pb2_grpc.RunServiceStub]:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


def create_run(
    runs: runs_pb2_grpc.RunServiceStub,
    project: str,
    config: dict[str, Any],
    *,
    display_name: str = "",
    job_version: str = "",
    group: str = "",
    tags: Sequence[str] = (),
) -> runs_pb2.Run:
    """A run as an agent and its job would leave it: created, with a history and a summary, finished."""
    run = runs_pb2.Run(
        config=dict_to_struct(config),
        display_name=display_name,
        job_version=job_version,
        group=group,
        tags=tags,
    )
    created = runs.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{project}", run=run)).run
    rows = [
        runs_pb2.MetricRow(step=step, values={"train/loss": 1 / (step + 1), "tokens_seen": 1e6 * step})
        for step in range(30)
    ]
    runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=created.name, rows=rows))
    summary = {"best/accuracy": 0.9731, "epochs_done": 5}
    runs.UpdateSummary(runs_pb2.UpdateSummaryRequest(name=created.name, summary=dict_to_struct(summary)))
    finish = runs_pb2.FinishRunRequest(name=created.name, state=common_pb2.RUN_STATE_FINISHED, exit_code=0)
    runs.FinishRun(finish)
    return created


def fits(output: str) -> list[str]:
    """The lines of ``output``, each checked to fit the terminal."""
    lines = output.splitlines()
    too_wide = [line for line in lines if len(line.rstrip()) > TERMINAL_WIDTH]
    assert not too_wide, "\n".join(too_wide)
    return lines


def first_column(lines: list[str], header: str) -> list[str]:
    """The first cell of each row of the table whose header row starts with ``header``."""
    start = next(index for index, line in enumerate(lines) if line.split()[:1] == [header])
    rows = []
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.strip():
            break
        if not line.startswith("  "):  # a row's first line, not one of its folded lines
            rows.append(line.split()[0])
    return rows


async def test_every_table_fits_80_columns_and_its_ids_are_taken_by_other_commands(
    *,
    takeoff: Takeoff,
    client: Client,
    runs: runs_pb2_grpc.RunServiceStub,
    registry: ServiceProcess,
    queue_service: ServiceProcess,
    project: str,
    tmp_path: Path,
) -> None:
    version = make_code_job(registry.address, project, "resnet50-imagenet-finetune", tmp_path)
    created = [
        create_run(
            runs,
            project,
            {"epochs": 90, "lr": lr, "optimizer": {"name": "adamw", "betas": [0.9, 0.99]}},
            display_name=f"sweep lr={lr} warmup cosine schedule with label smoothing",
            job_version=version,
            group="sweep-2025-11",
            tags=["baseline", "imagenet"],
        )
        for lr in (0.1, 0.01, 0.001)
    ]
    description = "GPU jobs for the vision team; launches over 4 GPUs wait for the night window"
    client.create_queue("vision-a100-large", description=description, paused=True)
    client.create_queue(
        "cpu-preprocessing",
        template_variables={"threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 8}},
        description=description,
    )
    for display_name in ("CI deploy bot for the vision team's nightly evaluation", ""):
        client.create_key("project", projects=[project], role="write", display_name=display_name)
    client.create_key("agent", queues=["vision-a100-large"], display_name="a100 node pool, rack 7")
    client.set_secret("huggingface-token-for-private-models", "hf_xyz")
    agent = await ScriptedAgent(queue_service.address).connect(
        [f"projects/{project}/queues/cpu-preprocessing"], capacity=4
    )
    try:
        shown = {
            args: await asyncio.to_thread(takeoff, *args)
            for args in [
                ("runs", "list"),
                ("runs", "show", created[0].name.rsplit("/", 1)[-1]),
                ("queue", "list"),
                ("queue", "describe", "cpu-preprocessing"),
                ("agents", "--queue", "cpu-preprocessing"),
                ("keys", "list"),
                ("secrets", "list"),
            ]
        }
    finally:
        await agent.close()

    for args, outcome in shown.items():
        assert outcome.code == 0, (args, outcome.err)
        fits(outcome.out)
    listed = first_column(fits(shown["runs", "list"].out), "run")
    assert sorted(listed) == sorted(run.name.rsplit("/", 1)[-1][:8] for run in created)
    for prefix in listed:
        again = takeoff("runs", "show", prefix, "--json")
        assert json.loads(again.out)["run"]["name"].rsplit("/", 1)[-1].startswith(prefix)
    assert "huggingface-token-for-private-models" in shown["secrets", "list"].out  # names stay whole
    assert first_column(fits(shown["agents", "--queue", "cpu-preprocessing"].out), "agent") == [
        agent.agent_id[:8]
    ]
    wide = takeoff("runs", "list", "--wide").out
    assert all(run.name.rsplit("/", 1)[-1] in wide for run in created)
    assert "group" in wide  # a column only --wide shows


def test_whole_numbers_print_as_integers(
    takeoff: Takeoff, runs: runs_pb2_grpc.RunServiceStub, project: str
) -> None:
    run = create_run(runs, project, {"epochs": 5, "batch_size": 256, "lr": 0.5})

    shown = takeoff("runs", "show", run.name).out

    for key, value in (("epochs", "5"), ("batch_size", "256"), ("epochs_done", "5"), ("lr", "0.5")):
        assert re.search(rf"^ {key} +{value} *$", shown, re.MULTILINE), shown
    assert re.search(r"^ tokens_seen +30 +29000000 +0 +29000000 ", shown, re.MULTILINE), shown


def test_short_times_say_as_much_as_their_age_needs() -> None:
    now = datetime(2026, 12, 2, 14, 30, tzinfo=UTC).astimezone()
    assert short_time(now - timedelta(minutes=27), now=now) == (now - timedelta(minutes=27)).strftime("%H:%M")
    assert short_time(now - timedelta(days=3), now=now) == (now - timedelta(days=3)).strftime("%b %d")
    assert short_time(now - timedelta(days=400), now=now) == (now - timedelta(days=400)).strftime("%Y-%m-%d")
    assert short_time(now, wide=True) == now.strftime("%Y-%m-%d %H:%M:%S")
    assert short_time(None) == "-"


def test_a_run_prefix_finds_one_run_or_names_the_runs_it_could_be(
    takeoff: Takeoff, client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str
) -> None:
    for run_id in ("sweepaa1", "sweepaa2", "baseline7"):
        runs.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id=run_id))

    assert client.get_run("sweepaa1").id == "sweepaa1"
    assert client.get_run("base").id == "baseline7"
    with pytest.raises(InvalidArgumentError, match="run prefix 'sweep' matches several runs: sweepaa"):
        client.get_run("sweep")
    with pytest.raises(NotFoundError, match="RUN_NOT_FOUND"):
        client.get_run("nothing")

    ambiguous = takeoff("runs", "show", "sweepa")
    assert ambiguous.code == 1
    assert ambiguous.err.strip().splitlines() == [
        "error: ARGUMENT_INVALID: run prefix 'sweepa' matches several runs: sweepaa2, sweepaa1;"
        " give more characters"
    ]


def test_an_item_prefix_needs_no_queue_and_names_the_items_it_could_be(
    client: Client, registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    make_code_job(registry.address, project, "train", tmp_path)
    client.create_queue("first", paused=True)
    client.create_queue("second", paused=True)
    # 17 ids of hex digits: two of them start alike (and a prefix may span queues).
    items = [client.launch("train", queue) for queue in ["first", "second"] * 8 + ["first"]]
    shared = next(item.id[0] for item in items if sum(other.id[0] == item.id[0] for other in items) > 1)
    one = items[0]

    assert client.get_item(one.id[:8]).name == one.name
    assert client.get_item(f"{one.queue.rsplit('/', 1)[-1]}/{one.id[:8]}").name == one.name
    with pytest.raises(InvalidArgumentError, match=f"item prefix '{shared}' matches several items"):
        client.get_item(shared)
    with pytest.raises(NotFoundError, match="ITEM_NOT_FOUND"):
        client.get_item("0" * 20)
    with pytest.raises(NotFoundError, match="ITEM_NOT_FOUND"):
        client.get_item("not-hex")
    assert client.cancel_item(one.id[:8]).name == one.name


def test_a_key_prefix_finds_one_key(client: Client) -> None:
    for name in ("ci-bot-1", "ci-bot-2", "deploy-bot"):  # keys are not in a project: name them after it
        client.create_key("admin", key_id=f"{client.project}-{name}")

    assert client.get_key(f"{client.project}-deploy").id == f"{client.project}-deploy-bot"
    with pytest.raises(InvalidArgumentError, match=f"key prefix '{client.project}-ci' matches several keys"):
        client.revoke_key(f"{client.project}-ci")
    assert client.revoke_key(f"{client.project}-ci-bot-2").revoked


async def test_runs_show_and_logs_take_an_item_for_the_run_of_its_latest_attempt(
    *,
    takeoff: Takeoff,
    client: Client,
    runs: runs_pb2_grpc.RunServiceStub,
    registry: ServiceProcess,
    queue_service: ServiceProcess,
    project: str,
    tmp_path: Path,
) -> None:
    make_code_job(registry.address, project, "train", tmp_path)
    client.create_queue("cpu")
    waiting = client.launch("train", "cpu", config={"epochs": 3})
    agent = await ScriptedAgent(queue_service.address).connect([f"projects/{project}/queues/cpu"])
    try:
        assignment = (await agent.next("assignment")).assignment
        run_id = assignment.run.rsplit("/", 1)[-1]
        runs.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id=run_id))
        lines = [
            runs_pb2.LogLine(text="epoch 1"),
            runs_pb2.LogLine(text="[takeoff] attempt 1 started", stream=runs_pb2.LOG_STREAM_SYSTEM),
            runs_pb2.LogLine(text="pip install numpy", stream=runs_pb2.LOG_STREAM_BUILD),
        ]
        runs.AppendLogs(runs_pb2.AppendLogsRequest(name=assignment.run, lines=lines))
        pending = client.launch("train", "cpu")

        shown = await asyncio.to_thread(takeoff, "runs", "show", waiting.id[:8], "--json")
        logs = await asyncio.to_thread(takeoff, "logs", f"cpu/{waiting.id}")
        logs_json = await asyncio.to_thread(takeoff, "logs", waiting.id[:8], "--json")
        not_yet = await asyncio.to_thread(takeoff, "runs", "show", pending.id)
        await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED, exit_code=0)
    finally:
        await agent.close()

    assert json.loads(shown.out)["run"]["name"] == assignment.run
    assert logs.out.splitlines() == ["epoch 1", "[takeoff] attempt 1 started", "[build] pip install numpy"]
    assert all(json.loads(line)["time"] for line in logs_json.out.splitlines())
    assert not_yet.code == 1
    assert f"item {pending.id} has no run yet: it is PENDING" in not_yet.err


def test_version_help_and_exit_codes(takeoff: Takeoff) -> None:
    assert takeoff("--version") == Outcome(0, f"takeoff {takeoff_version}\n", "")
    helped = takeoff("--help")
    assert "--install-completion" in helped.out
    assert "2 the command was called wrongly" in " ".join(helped.out.split())
    options = takeoff("runs", "list", "--help").out
    for named in ("PROJECT", "STATE", "N"):
        assert f" {named} " in options
    for python_type in ("<str>", "<int>", "<bool>", "<list[str]>"):
        assert python_type not in options

    for args in (
        ["runs", "list", "--state", "sleeping"],  # ours
        ["runs", "list", "--limit", "many"],  # typer's
        ["queue", "create", "cpu", "--var", "threads"],
        ["runs"],
        ["no-such-command"],
    ):
        outcome = takeoff(*args)
        assert outcome.code == 2, (args, outcome)
        assert "Traceback" not in outcome.err


def test_an_unreachable_queue_service_is_named_with_takeoff_up(
    takeoff: Takeoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAKEOFF_QUEUE_ADDRESS", "127.0.0.1:1")

    refused = takeoff("queue", "list")

    assert refused.code == 1
    assert refused.err.startswith("error: UNAVAILABLE: cannot reach 127.0.0.1:1")
    assert "`takeoff up` starts one" in refused.err
    assert len(refused.err.strip().splitlines()) == 1


def test_queue_delete_asks_first(takeoff: Takeoff, client: Client) -> None:
    client.create_queue("cpu")

    declined = takeoff("queue", "delete", "cpu", stdin=io.StringIO("n\n"))
    unanswered = takeoff("queue", "delete", "cpu")  # a script with nothing on its input

    assert declined.code == 1
    assert "delete queue cpu and its 0 item(s)?" in declined.out
    assert "nothing deleted" in declined.err
    assert unanswered.code == 2
    assert "give --yes" in unanswered.err
    assert client.get_queue("cpu").id == "cpu"
    assert takeoff("queue", "delete", "cpu", stdin=io.StringIO("y\n")).code == 0
    with pytest.raises(NotFoundError):
        client.get_queue("cpu")
    client.create_queue("cpu")
    assert takeoff("queue", "delete", "cpu", "--yes").out == "deleted queue cpu\n"


def test_the_shell_completes_commands(takeoff: Takeoff, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_TAKEOFF_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "takeoff ru")
    monkeypatch.setenv("COMP_CWORD", "1")

    assert takeoff().out.split() == ["runs"]


def test_a_table_whose_ids_outgrow_the_terminal_is_printed_wider_not_cut(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(console, "width", 40)
    queue = "preprocessing-for-the-vision-team-nightly-evaluation-runs"
    listing = Listing([Column("queue"), Column("description", free_text=True), Column("agents")], wide=False)
    listing.add_row(queue, "what the queue is for, at some length", "3")

    listing.print()

    shown = capsys.readouterr().out
    assert ["queue", "description", "agents"] in [line.split() for line in shown.splitlines()]
    assert f" {queue} " in shown
    assert "at some" in shown  # folded, as free text may be
