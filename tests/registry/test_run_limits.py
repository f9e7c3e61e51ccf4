"""RunService's limits on a real registry: sizes of configs, summaries and metrics, unknown enum numbers,
and pages and streamed messages that stay under a client's default 4 MiB receive size."""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf import timestamp_pb2

from takeoff.v1 import common_pb2, runs_pb2
from takeoff_registry.runs import MAX_METRIC_KEYS
from takeoff_server.pagination import MAX_PAGE_BYTES
from takeoff_server.protovalues import dict_to_struct, struct_to_dict
from takeoff_server.validation import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from tests.registry.conftest import Registry, failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROJECT = "projects/limits"


async def new_run(registry: Registry, run_id: str, **fields: Any) -> str:
    created = await registry.runs.CreateRun(
        runs_pb2.CreateRunRequest(parent=PROJECT, run_id=run_id, run=runs_pb2.Run(**fields))
    )
    return created.run.name


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_configs_beyond_the_limits_are_refused_and_create_nothing(registry: Registry) -> None:
    for config, problem in (
        ({"blob": "x" * MAX_CONFIG_BYTES}, "bytes"),
        (deep(MAX_CONFIG_DEPTH + 1), "deeper"),
    ):
        refused = await failure(new_run(registry, "big", config=dict_to_struct(config)))

        assert (refused.code, refused.reason, refused.fields) == (INVALID, "ARGUMENT_INVALID", ["run.config"])
        assert problem in refused.message
    assert await registry.count_rows("registry_runs") == 0

    name = await new_run(registry, "ok", config=dict_to_struct(deep(MAX_CONFIG_DEPTH)))
    refused = await failure(
        registry.runs.AttachRun(
            runs_pb2.AttachRunRequest(name=name, config=dict_to_struct({"blob": "x" * MAX_CONFIG_BYTES}))
        )
    )
    assert (refused.reason, refused.fields) == ("ARGUMENT_INVALID", ["config"])


async def test_a_summary_that_would_outgrow_its_limit_is_refused_and_kept_as_it_was(
    registry: Registry,
) -> None:
    name = await new_run(registry, "summary")
    half = "x" * (MAX_CONFIG_BYTES // 2)
    await registry.runs.UpdateSummary(
        runs_pb2.UpdateSummaryRequest(name=name, summary=dict_to_struct({"a": half}))
    )

    refused = await failure(
        registry.runs.UpdateSummary(
            runs_pb2.UpdateSummaryRequest(name=name, summary=dict_to_struct({"b": half}))
        )
    )

    assert (refused.code, refused.reason, refused.fields) == (INVALID, "ARGUMENT_INVALID", ["summary"])
    run = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=name))).run
    assert set(struct_to_dict(run.summary)) == {"a"}


async def test_metric_keys_are_bounded_in_length_and_number(registry: Registry) -> None:
    name = await new_run(registry, "metrics")
    long_key = runs_pb2.MetricRow(step=0, values={"k" * 257: 1.0})
    refused = await failure(
        registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=name, rows=[long_key]))
    )
    assert (refused.reason, refused.fields) == ("ARGUMENT_INVALID", ["rows"])

    many = [runs_pb2.MetricRow(step=0, values={f"m{n}": 1.0}) for n in range(MAX_METRIC_KEYS)]
    await registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=name, rows=many))
    one_more = runs_pb2.MetricRow(step=1, values={"m-new": 1.0})
    refused = await failure(
        registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=name, rows=[one_more]))
    )

    assert (refused.reason, refused.fields) == ("ARGUMENT_INVALID", ["rows"])
    run = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=name))).run
    assert (run.history_length, len(run.metric_keys)) == (MAX_METRIC_KEYS, MAX_METRIC_KEYS)


async def test_times_a_timestamp_cannot_hold_are_refused(registry: Registry) -> None:
    name = await new_run(registry, "times")
    beyond = timestamp_pb2.Timestamp(seconds=10**15)

    rows = await failure(
        registry.runs.BatchLogMetrics(
            runs_pb2.BatchLogMetricsRequest(name=name, rows=[runs_pb2.MetricRow(step=0, time=beyond)])
        )
    )
    lines = await failure(
        registry.runs.AppendLogs(
            runs_pb2.AppendLogsRequest(name=name, lines=[runs_pb2.LogLine(text="x", time=beyond)])
        )
    )

    assert (rows.code, rows.reason, rows.fields) == (INVALID, "ARGUMENT_INVALID", ["rows[0].time"])
    assert (lines.code, lines.reason, lines.fields) == (INVALID, "ARGUMENT_INVALID", ["lines[0].time"])
    run = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=name))).run
    assert (run.history_length, run.log_line_count) == (0, 0)


async def test_unknown_enum_numbers_in_filters_are_invalid_argument(registry: Registry) -> None:
    name = await new_run(registry, "enums")
    unknown_state = cast(common_pb2.RunState.ValueType, 99)
    unknown_stream = cast(runs_pb2.LogStream.ValueType, 99)

    states = await failure(
        registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent=PROJECT, states=[unknown_state]))
    )
    streams = await failure(
        anext(aiter(registry.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=name, streams=[unknown_stream]))))
    )

    assert (states.code, states.reason, states.fields) == (INVALID, "ARGUMENT_INVALID", ["states[0]"])
    assert (streams.code, streams.reason, streams.fields) == (INVALID, "ARGUMENT_INVALID", ["streams[0]"])


async def test_a_page_of_runs_with_big_configs_ends_before_3_mib(registry: Registry) -> None:
    config = dict_to_struct({"blob": "x" * (MAX_CONFIG_BYTES - 64)})
    for n in range(14):  # 3.5 MiB of configs
        await new_run(registry, f"run-{n:02}", config=config)

    names: list[str] = []
    pages = 0
    token = ""
    while True:
        page = await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent=PROJECT, page_token=token))
        assert page.ByteSize() <= MAX_PAGE_BYTES + 1024
        names += [run.name.rsplit("/", 1)[1] for run in page.runs]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert names == [f"run-{n:02}" for n in reversed(range(14))]
    assert pages == 2


async def test_long_log_lines_are_streamed_in_messages_under_the_receive_limit(registry: Registry) -> None:
    name = await new_run(registry, "logs")
    line = "y" * (60 * 1024)
    for _ in range(2):  # 120 lines of 60 KiB: 7 MiB
        await registry.runs.AppendLogs(
            runs_pb2.AppendLogsRequest(name=name, lines=[runs_pb2.LogLine(text=line) for _ in range(60)])
        )

    messages = [message async for message in registry.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=name))]

    assert [line.index for message in messages for line in message.lines] == list(range(120))
    assert all(message.ByteSize() <= MAX_PAGE_BYTES for message in messages)
