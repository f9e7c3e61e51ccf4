"""The client and ``takeoff logs`` on a multi-node run's log lines, and ``read_metrics(max_points=)``, against
a real registry."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from takeoff import Client, InvalidArgumentError, LogStream
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.sdk.test_cli import takeoff


@pytest.fixture
def runs(registry: ServiceProcess) -> Iterator[runs_pb2_grpc.RunServiceStub]:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


def new_run(runs: runs_pb2_grpc.RunServiceStub, project: str) -> str:
    return runs.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{project}"), timeout=10).run.name


def test_lines_of_each_rank_are_labelled_with_it(
    registry: ServiceProcess, client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str
) -> None:
    name = new_run(runs, project)
    lines = [
        runs_pb2.LogLine(text="pip install numpy", stream=runs_pb2.LOG_STREAM_BUILD),
        runs_pb2.LogLine(text="rank 0: sum of ranks 1", rank=0),
        runs_pb2.LogLine(text="rank 1: sum of ranks 1", rank=1),
        runs_pb2.LogLine(
            text="Traceback (most recent call last):", rank=1, stream=runs_pb2.LOG_STREAM_STDERR
        ),
    ]
    runs.AppendLogs(runs_pb2.AppendLogsRequest(name=name, lines=lines), timeout=10)
    run_id = name.rsplit("/", 1)[-1]

    read = list(client.read_logs(run_id))
    printed = takeoff(registry.address, project, "logs", run_id)
    printed_json = takeoff(registry.address, project, "logs", run_id, "--json")

    assert [(line.rank, line.stream) for line in read] == [
        (None, LogStream.BUILD),
        (0, LogStream.STDOUT),
        (1, LogStream.STDOUT),
        (1, LogStream.STDERR),
    ]
    assert printed.stdout.splitlines() == [
        "[build] pip install numpy",
        "[rank 0] rank 0: sum of ranks 1",
        "[rank 1] rank 1: sum of ranks 1",
        "[rank 1] Traceback (most recent call last):",
    ]
    assert [json.loads(line).get("rank") for line in printed_json.stdout.splitlines()] == [None, 0, 1, 1]


def test_read_metrics_downsamples_a_long_history(
    client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str
) -> None:
    name = new_run(runs, project)
    rows = [runs_pb2.MetricRow(step=step, values={"loss": 1 / (step + 1)}) for step in range(2000)]
    rows[1000].values["loss"] = 50.0
    runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=name, rows=rows), timeout=10)

    sampled = list(client.read_metrics(name, keys=["loss"], max_points=100))

    indices = [row.index for row in sampled]
    assert len(indices) <= 102
    assert {0, 1000, 1999} <= set(indices)
    assert indices == sorted(set(indices))
    with pytest.raises(InvalidArgumentError) as refused:
        list(client.read_metrics(name, max_points=3))
    assert [violation.field for violation in refused.value.violations] == ["max_points"]
