"""Log lines of a multi-node launch carry their rank: stored exactly once, read back, checked."""

from __future__ import annotations

import grpc

from takeoff.v1 import runs_pb2
from tests.registry.conftest import Registry, failure
from tests.registry.test_runs import create_run, read_logs


def line(
    text: str, rank: int | None = None, stream: runs_pb2.LogStream.ValueType = runs_pb2.LOG_STREAM_UNSPECIFIED
) -> runs_pb2.LogLine:
    return runs_pb2.LogLine(text=text, rank=rank, stream=stream)


async def append(
    registry: Registry, name: str, lines: list[runs_pb2.LogLine], first: int | None = None
) -> runs_pb2.AppendLogsResponse:
    return await registry.runs.AppendLogs(
        runs_pb2.AppendLogsRequest(name=name, lines=lines, first_line_index=first)
    )


def ranks(lines: list[runs_pb2.LogLine]) -> list[tuple[str, int | None]]:
    return [(line.text, line.rank if line.HasField("rank") else None) for line in lines]


async def test_ranks_are_read_back_as_written_and_unset_stays_unset(registry: Registry) -> None:
    run = await create_run(registry)
    await append(registry, run.name, [line("pip install ...", stream=runs_pb2.LOG_STREAM_BUILD)])
    await append(registry, run.name, [line("rank 0 up", 0), line("rank 1 up", 1)], first=1)
    retried = await append(registry, run.name, [line("rank 0 up", 0), line("rank 1 up", 1)], first=1)
    await append(registry, run.name, [line("rank 1 failed", 1, stream=runs_pb2.LOG_STREAM_STDERR)])

    assert (retried.accepted_lines, retried.skipped_lines, retried.log_line_count) == (0, 2, 3)
    assert ranks(await read_logs(registry, run.name)) == [
        ("pip install ...", None),
        ("rank 0 up", 0),
        ("rank 1 up", 1),
        ("rank 1 failed", 1),
    ]
    assert ranks(await read_logs(registry, run.name, tail=1)) == [("rank 1 failed", 1)]


async def test_a_batch_with_a_negative_rank_is_refused_whole(registry: Registry) -> None:
    run = await create_run(registry)

    refused = await failure(append(registry, run.name, [line("fine", 0), line("bad", -1), line("bad", -2)]))

    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID")
    assert refused.fields == ["lines[1].rank", "lines[2].rank"]
    assert await read_logs(registry, run.name) == []
