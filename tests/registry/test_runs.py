"""RunService on a real registry: life cycle, metrics and logs exactly once, summaries, streams, listing."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

import takeoff_registry.__main__
from takeoff.v1 import common_pb2, jobs_pb2, runs_pb2
from takeoff_registry.runs import Runs
from takeoff_server.names import is_valid_id
from takeoff_server.protovalues import dict_to_struct, struct_to_dict
from tests.registry.conftest import Registry, failure, registry_settings, start_registry, stream

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ITEM = "projects/demo/queues/gpu/items/item-1"


async def create_run(registry: Registry, run_id: str = "", **run: Any) -> runs_pb2.Run:
    response = await registry.runs.CreateRun(
        runs_pb2.CreateRunRequest(parent="projects/demo", run_id=run_id, run=runs_pb2.Run(**run))
    )
    return response.run


async def image_job(registry: Registry, job: str = "train", *, versions: int = 1) -> None:
    for number in range(versions):
        await registry.jobs.CreateJobVersion(
            jobs_pb2.CreateJobVersionRequest(
                parent=f"projects/demo/jobs/{job}",
                allow_missing=True,
                version=common_pb2.JobVersion(
                    source=common_pb2.JobSource(image=common_pb2.ImageSource(reference=f"python:3.{number}"))
                ),
            )
        )


def rows(steps: range, **extra: float) -> list[runs_pb2.MetricRow]:
    return [runs_pb2.MetricRow(step=step, values={"loss": 1 / (step + 1), **extra}) for step in steps]


async def log_metrics(
    registry: Registry, name: str, batch: list[runs_pb2.MetricRow], first: int | None = None
) -> runs_pb2.BatchLogMetricsResponse:
    return await registry.runs.BatchLogMetrics(
        runs_pb2.BatchLogMetricsRequest(name=name, rows=batch, first_row_index=first)
    )


async def read_metrics(registry: Registry, name: str, **options: Any) -> list[runs_pb2.MetricRow]:
    request = runs_pb2.ReadMetricsRequest(name=name, **options)
    return [row async for message in registry.runs.ReadMetrics(request) for row in message.rows]


async def append_logs(
    registry: Registry, name: str, texts: list[str], first: int | None = None, **line: Any
) -> runs_pb2.AppendLogsResponse:
    lines = [runs_pb2.LogLine(text=text, **line) for text in texts]
    return await registry.runs.AppendLogs(
        runs_pb2.AppendLogsRequest(name=name, lines=lines, first_line_index=first)
    )


async def read_logs(registry: Registry, name: str, **options: Any) -> list[runs_pb2.LogLine]:
    request = runs_pb2.ReadLogsRequest(name=name, **options)
    return [line async for message in registry.runs.ReadLogs(request) for line in message.lines]


async def finish(
    registry: Registry,
    name: str,
    state: common_pb2.RunState.ValueType = common_pb2.RUN_STATE_FINISHED,
    **fields: Any,
) -> runs_pb2.FinishRunResponse:
    return await registry.runs.FinishRun(runs_pb2.FinishRunRequest(name=name, state=state, **fields))


async def test_a_launched_attempt_from_creation_to_end(registry: Registry) -> None:
    await image_job(registry)
    created = await create_run(
        registry,
        "run-1",
        job_version="train:v0",
        queue_item=ITEM,
        attempt=1,
        config=dict_to_struct({"lr": 0.1}),
    )
    assert created.name == "projects/demo/runs/run-1"
    assert created.job_version == "projects/demo/jobs/train/versions/0"
    assert (created.queue_item, created.attempt, created.state) == (ITEM, 1, common_pb2.RUN_STATE_STARTING)
    assert not created.HasField("start_time")

    attached = await registry.runs.AttachRun(
        runs_pb2.AttachRunRequest(
            name=created.name, config=dict_to_struct({"lr": 0.1, "epochs": 3}), display_name="brave-fox"
        )
    )
    assert attached.run.state == common_pb2.RUN_STATE_RUNNING
    assert attached.run.HasField("start_time")
    assert struct_to_dict(attached.run.config) == {"lr": 0.1, "epochs": 3}
    assert attached.run.display_name == "brave-fox"

    twice = await failure(registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=created.name)))
    assert (twice.code, twice.reason) == (FAILED_PRECONDITION, "RUN_ALREADY_ATTACHED")

    by_sdk = await finish(registry, created.name, common_pb2.RUN_STATE_FINISHED, message="done")
    assert (by_sdk.run.state, by_sdk.already_ended, by_sdk.run.HasField("exit_code")) == (
        common_pb2.RUN_STATE_FINISHED,
        False,
        False,
    )
    by_agent = await finish(registry, created.name, common_pb2.RUN_STATE_FAILED, exit_code=0, message="agent")
    assert by_agent.already_ended
    assert (by_agent.run.state, by_agent.run.exit_code, by_agent.run.message) == (
        common_pb2.RUN_STATE_FINISHED,
        0,
        "done",
    )
    assert by_agent.run.end_time == by_sdk.run.end_time

    ended = await failure(registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=created.name)))
    assert (ended.code, ended.reason) == (FAILED_PRECONDITION, "RUN_ENDED")
    got = await registry.runs.GetRun(runs_pb2.GetRunRequest(name=created.name))
    assert got.run == by_agent.run


async def test_runs_made_outside_a_launch_get_fresh_ids(registry: Registry) -> None:
    first, second = await create_run(registry), await create_run(registry)

    ids = {first.name.rsplit("/", 1)[1], second.name.rsplit("/", 1)[1]}
    assert len(ids) == 2
    assert all(is_valid_id(run_id) for run_id in ids)
    assert (first.job_version, first.queue_item, first.attempt) == ("", "", 0)


async def test_create_run_refusals(registry: Registry) -> None:
    await image_job(registry)
    await create_run(registry, "run-1")

    cases = [
        (create_run(registry, "run-1"), grpc.StatusCode.ALREADY_EXISTS, "RUN_ALREADY_EXISTS", []),
        (create_run(registry, "Run 1"), INVALID, "NAME_INVALID", ["run_id"]),
        (create_run(registry, job_version="nope:v0"), NOT_FOUND, "JOB_NOT_FOUND", []),
        (create_run(registry, job_version="train:v4"), NOT_FOUND, "JOB_VERSION_NOT_FOUND", []),
        (create_run(registry, job_version="train:BAD"), INVALID, "NAME_INVALID", ["run.job_version"]),
        (
            create_run(registry, queue_item="projects/demo/items/x"),
            INVALID,
            "NAME_INVALID",
            ["run.queue_item"],
        ),
        (create_run(registry, attempt=-1), INVALID, "ARGUMENT_INVALID", ["run.attempt"]),
        (create_run(registry, display_name="n" * 257), INVALID, "ARGUMENT_INVALID", ["run.display_name"]),
    ]
    for call, code, reason, fields in cases:
        problem = await failure(call)
        assert (problem.code, problem.reason, problem.fields) == (code, reason, fields)
    assert await registry.count_rows("registry_runs") == 1


async def test_an_agent_retrying_create_run_with_its_request_id_gets_the_same_run(registry: Registry) -> None:
    request = runs_pb2.CreateRunRequest(
        parent="projects/demo",
        run_id="run-7",
        run=runs_pb2.Run(queue_item=ITEM, attempt=2),
        request_id="lease-7",
    )
    first = await registry.runs.CreateRun(request)
    await registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=first.run.name))

    retried = await registry.runs.CreateRun(request)

    assert retried.run.name == first.run.name
    assert retried.run.state == common_pb2.RUN_STATE_RUNNING  # the run as it is now
    other = runs_pb2.CreateRunRequest(parent="projects/demo", run_id="run-8", request_id="lease-7")
    conflict = await failure(registry.runs.CreateRun(other))
    assert (conflict.code, conflict.reason) == (INVALID, "REQUEST_ID_CONFLICT")
    assert await registry.count_rows("registry_runs") == 1


async def test_metric_batches_are_stored_exactly_once(registry: Registry) -> None:
    run = await create_run(registry)

    first = await log_metrics(registry, run.name, rows(range(100)), first=0)
    resent = await log_metrics(registry, run.name, rows(range(100)), first=0)
    overlapping = await log_metrics(registry, run.name, rows(range(50, 150)), first=50)
    appended = await log_metrics(registry, run.name, rows(range(150, 160)))
    gap = await failure(log_metrics(registry, run.name, rows(range(200, 210)), first=200))

    assert (first.accepted_rows, first.skipped_rows, first.history_length) == (100, 0, 100)
    assert (resent.accepted_rows, resent.skipped_rows, resent.history_length) == (0, 100, 100)
    assert (overlapping.accepted_rows, overlapping.skipped_rows, overlapping.history_length) == (50, 50, 150)
    assert appended.history_length == 160
    assert (gap.code, gap.reason, gap.metadata) == (FAILED_PRECONDITION, "SEQUENCE_GAP", {"length": "160"})
    stored = await read_metrics(registry, run.name)
    assert [row.index for row in stored] == list(range(160))
    assert [row.step for row in stored] == list(range(160))


async def test_the_run_keeps_the_totals_of_its_history(registry: Registry) -> None:
    run = await create_run(registry)
    batch = [
        runs_pb2.MetricRow(step=5, values={"loss": 0.5}),
        runs_pb2.MetricRow(step=9, values={"accuracy": 0.9}, data=dict_to_struct({"sample": "a cat"})),
        runs_pb2.MetricRow(step=7, values={"loss": 0.4}),
    ]
    await log_metrics(registry, run.name, batch)

    got = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert (got.history_length, got.last_step) == (3, 9)
    assert list(got.metric_keys) == ["accuracy", "loss", "sample"]
    assert got.update_time.ToDatetime() > run.update_time.ToDatetime()


async def test_read_metrics_from_an_index_and_for_chosen_keys(registry: Registry) -> None:
    run = await create_run(registry)
    logged_at = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    await log_metrics(registry, run.name, rows(range(1500)))
    await log_metrics(
        registry, run.name, [runs_pb2.MetricRow(step=1500, values={"accuracy": 0.5}, time=logged_at)]
    )

    messages = [
        message async for message in registry.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=run.name))
    ]
    assert [len(message.rows) for message in messages] == [1000, 500, 1]
    assert all(row.HasField("time") for message in messages for row in message.rows)
    assert messages[-1].rows[0].time == logged_at

    later = await read_metrics(registry, run.name, start_index=1498)
    assert [row.index for row in later] == [1498, 1499, 1500]

    accuracy = await read_metrics(registry, run.name, keys=["accuracy"])
    assert [(row.index, dict(row.values)) for row in accuracy] == [(1500, {"accuracy": 0.5})]


async def test_log_metrics_streams_batches_of_one_run(registry: Registry) -> None:
    run = await create_run(registry)
    messages = [
        runs_pb2.LogMetricsRequest(name=run.name, rows=rows(range(10))),
        runs_pb2.LogMetricsRequest(rows=rows(range(10, 20))),
        runs_pb2.LogMetricsRequest(name=run.name, rows=rows(range(5, 25)), first_row_index=5),
    ]

    response = await registry.runs.LogMetrics(stream(messages))

    assert (response.accepted_rows, response.skipped_rows, response.history_length) == (25, 15, 25)
    other = await create_run(registry)
    mixed = [
        runs_pb2.LogMetricsRequest(name=run.name, rows=rows(range(1))),
        runs_pb2.LogMetricsRequest(name=other.name, rows=rows(range(1))),
    ]
    problem = await failure(registry.runs.LogMetrics(stream(mixed)))
    assert (problem.code, problem.reason, problem.fields) == (INVALID, "ARGUMENT_INVALID", ["name"])


async def test_metric_rows_that_break_the_rules_are_refused(registry: Registry) -> None:
    run = await create_run(registry)
    negative = rows(range(3))
    negative[1].step = -1
    clash = [runs_pb2.MetricRow(step=0, values={"loss": 1.0}, data=dict_to_struct({"loss": "high"}))]

    cases = [
        (negative, ["rows[1].step"]),
        (clash, ["rows[0].data"]),
        ([], ["rows"]),
        (rows(range(10_001)), ["rows"]),
    ]
    for batch, fields in cases:
        problem = await failure(log_metrics(registry, run.name, batch))
        assert (problem.code, problem.reason, problem.fields) == (INVALID, "ARGUMENT_INVALID", fields)
    assert await registry.count_rows("registry_metric_chunks") == 0

    missing = await failure(log_metrics(registry, "projects/demo/runs/ghost", rows(range(1))))
    assert (missing.code, missing.reason) == (NOT_FOUND, "RUN_NOT_FOUND")
    await finish(registry, run.name)
    ended = await failure(log_metrics(registry, run.name, rows(range(1))))
    assert (ended.code, ended.reason) == (FAILED_PRECONDITION, "RUN_ENDED")


async def test_summary_merges_keys_and_null_deletes(registry: Registry) -> None:
    run = await create_run(registry)

    await registry.runs.UpdateSummary(
        runs_pb2.UpdateSummaryRequest(
            name=run.name, summary=dict_to_struct({"best_loss": 0.3, "note": "x", "worst": math.inf})
        )
    )
    merged = await registry.runs.UpdateSummary(
        runs_pb2.UpdateSummaryRequest(name=run.name, summary=dict_to_struct({"note": None, "best_loss": 0.2}))
    )

    assert struct_to_dict(merged.summary) == {"best_loss": 0.2, "worst": math.inf}
    got = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert struct_to_dict(got.summary) == {"best_loss": 0.2, "worst": math.inf}
    await finish(registry, run.name)
    ended = await failure(
        registry.runs.UpdateSummary(
            runs_pb2.UpdateSummaryRequest(name=run.name, summary=dict_to_struct({"a": 1}))
        )
    )
    assert (ended.code, ended.reason) == (FAILED_PRECONDITION, "RUN_ENDED")


async def test_logs_are_kept_from_creation_to_after_the_end_exactly_once(registry: Registry) -> None:
    run = await create_run(registry)
    await append_logs(registry, run.name, ["pip install ..."], stream=runs_pb2.LOG_STREAM_BUILD)
    await append_logs(registry, run.name, ["epoch 1", "epoch 2"], first=1)
    retried = await append_logs(registry, run.name, ["epoch 1", "epoch 2"], first=1)
    await append_logs(registry, run.name, ["Traceback ..."], stream=runs_pb2.LOG_STREAM_STDERR)
    await finish(registry, run.name)
    after = await append_logs(registry, run.name, ["exit 0"], stream=runs_pb2.LOG_STREAM_SYSTEM)
    gap = await failure(append_logs(registry, run.name, ["lost"], first=9))

    assert (retried.accepted_lines, retried.skipped_lines, retried.log_line_count) == (0, 2, 3)
    assert after.log_line_count == 5
    assert (gap.code, gap.reason, gap.metadata) == (FAILED_PRECONDITION, "SEQUENCE_GAP", {"length": "5"})
    lines = await read_logs(registry, run.name)
    assert [(line.index, line.text) for line in lines] == list(
        enumerate(["pip install ...", "epoch 1", "epoch 2", "Traceback ...", "exit 0"])
    )
    assert lines[1].stream == runs_pb2.LOG_STREAM_STDOUT  # unset means stdout
    assert [line.text for line in await read_logs(registry, run.name, tail=2)] == ["Traceback ...", "exit 0"]
    stderr = await read_logs(registry, run.name, streams=[runs_pb2.LOG_STREAM_STDERR])
    assert [line.index for line in stderr] == [3]

    too_long = await failure(append_logs(registry, run.name, ["x" * (64 * 1024 + 1)]))
    assert (too_long.code, too_long.fields) == (INVALID, ["lines[0].text"])


async def follow(calls: AsyncIterable[Any], received: list[Any], arrived: asyncio.Event) -> None:
    async for message in calls:
        received.extend(getattr(message, "lines", None) or message.rows)
        arrived.set()


@pytest.fixture
async def registry_that_never_polls(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Registry]:
    """A registry whose followers poll the store once an hour: within a test only the wake-up that a
    change sends them can bring them news."""
    monkeypatch.setattr(takeoff_registry.__main__, "Runs", functools.partial(Runs, poll_seconds=3600))
    async for running in start_registry(registry_settings(tmp_path / "home", database_url)):
        yield running


async def test_following_logs_is_woken_by_each_append_and_ends_after_finish(
    registry_that_never_polls: Registry,
) -> None:
    registry = registry_that_never_polls
    run = await create_run(registry)
    await append_logs(registry, run.name, ["before"])
    received: list[runs_pb2.LogLine] = []
    arrived = asyncio.Event()
    follower = asyncio.create_task(
        follow(
            registry.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=run.name, follow=True)), received, arrived
        )
    )
    await asyncio.wait_for(arrived.wait(), timeout=10)

    for number in range(5):
        arrived.clear()
        await append_logs(registry, run.name, [f"line {number}"])
        await asyncio.wait_for(arrived.wait(), timeout=10)
        assert received[-1].text == f"line {number}"
    assert not follower.done()

    await append_logs(registry, run.name, ["last words"])
    await finish(registry, run.name)
    await asyncio.wait_for(follower, timeout=10)
    assert [line.text for line in received] == ["before", *(f"line {n}" for n in range(5)), "last words"]
    assert [line.index for line in received] == list(range(7))


async def test_following_metrics_ends_once_the_run_ended_and_every_row_was_sent(registry: Registry) -> None:
    run = await create_run(registry)
    received: list[runs_pb2.MetricRow] = []
    arrived = asyncio.Event()
    follower = asyncio.create_task(
        follow(
            registry.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=run.name, follow=True)),
            received,
            arrived,
        )
    )
    for start in range(0, 3000, 1000):
        await log_metrics(registry, run.name, rows(range(start, start + 1000)))
    await finish(registry, run.name)

    await asyncio.wait_for(follower, timeout=10)
    assert [row.index for row in received] == list(range(3000))


async def test_list_runs_filters_and_pages_newest_first(registry: Registry) -> None:
    await image_job(registry, "train", versions=2)
    await image_job(registry, "eval")
    v0, v1 = "projects/demo/jobs/train/versions/0", "projects/demo/jobs/train/versions/1"
    made = [
        await create_run(registry, "a", job_version=v0, queue_item=ITEM, attempt=1),
        await create_run(registry, "b", job_version=v0, queue_item=ITEM, attempt=2),
        await create_run(registry, "c", job_version=v1),
        await create_run(registry, "d", job_version="eval"),
        await create_run(registry, "e"),
    ]
    await registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=made[2].name))

    async def listed(**filters: Any) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            page = await registry.runs.ListRuns(
                runs_pb2.ListRunsRequest(parent="projects/demo", page_size=2, page_token=token, **filters)
            )
            names += [run.name.rsplit("/", 1)[1] for run in page.runs]
            if not (token := page.next_page_token):
                return names

    assert await listed() == ["e", "d", "c", "b", "a"]
    assert await listed(job="projects/demo/jobs/train") == ["c", "b", "a"]
    assert await listed(job=v0) == ["b", "a"]
    assert await listed(queue_item=ITEM) == ["b", "a"]
    assert await listed(states=[common_pb2.RUN_STATE_RUNNING]) == ["c"]
    assert await listed(states=[common_pb2.RUN_STATE_UNSPECIFIED]) == []

    first_page = await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo", page_size=1))
    changed = await failure(
        registry.runs.ListRuns(
            runs_pb2.ListRunsRequest(parent="projects/demo", job=v0, page_token=first_page.next_page_token)
        )
    )
    assert (changed.code, changed.reason) == (INVALID, "PAGE_TOKEN_INVALID")
    bad_filter = await failure(
        registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo", job="train"))
    )
    assert (bad_filter.reason, bad_filter.fields) == ("NAME_INVALID", ["job"])
    ghost = await failure(registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/ghost")))
    assert (ghost.code, ghost.reason) == (NOT_FOUND, "PROJECT_NOT_FOUND")


async def test_finish_run_takes_only_final_states(registry: Registry) -> None:
    run = await create_run(registry)

    for state in (
        common_pb2.RUN_STATE_UNSPECIFIED,
        common_pb2.RUN_STATE_RUNNING,
        common_pb2.RunState.ValueType(42),
    ):
        problem = await failure(finish(registry, run.name, state))
        assert (problem.code, problem.reason, problem.fields) == (INVALID, "ARGUMENT_INVALID", ["state"])
    killed = await finish(registry, run.name, common_pb2.RUN_STATE_KILLED, exit_code=-15, message="cancelled")
    assert (killed.run.state, killed.run.exit_code, killed.run.message) == (
        common_pb2.RUN_STATE_KILLED,
        -15,
        "cancelled",
    )


async def test_missing_runs_and_projects(registry: Registry) -> None:
    ghost_project = await failure(registry.runs.GetRun(runs_pb2.GetRunRequest(name="projects/ghost/runs/x")))
    assert (ghost_project.code, ghost_project.reason) == (NOT_FOUND, "PROJECT_NOT_FOUND")
    await create_run(registry)
    for call in (
        registry.runs.GetRun(runs_pb2.GetRunRequest(name="projects/demo/runs/x")),
        finish(registry, "projects/demo/runs/x"),
        append_logs(registry, "projects/demo/runs/x", ["hello"]),
    ):
        problem = await failure(call)
        assert (problem.code, problem.reason) == (NOT_FOUND, "RUN_NOT_FOUND")
    malformed = await failure(registry.runs.GetRun(runs_pb2.GetRunRequest(name="runs/x")))
    assert (malformed.code, malformed.reason, malformed.fields) == (INVALID, "NAME_INVALID", ["name"])


@pytest.mark.parametrize("follow_logs", [True, False])
async def test_reading_a_missing_run_fails_before_streaming(registry: Registry, follow_logs: bool) -> None:
    await create_run(registry)
    call = registry.runs.ReadLogs(runs_pb2.ReadLogsRequest(name="projects/demo/runs/x", follow=follow_logs))

    problem = await failure(call.read())

    assert (problem.code, problem.reason) == (NOT_FOUND, "RUN_NOT_FOUND")
