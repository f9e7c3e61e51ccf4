"""``takeoff artifacts list|versions|describe|get``, the lineage ``takeoff runs show`` prints and
``takeoff runs attempts``, against a real registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff import Client
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.sdk.conftest import Takeoff


@pytest.fixture
def runs(registry: ServiceProcess) -> Iterator[runs_pb2_grpc.RunServiceStub]:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


def new_run(runs: runs_pb2_grpc.RunServiceStub, project: str, run_id: str, **fields: object) -> str:
    request = runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id=run_id)
    request.run.MergeFrom(runs_pb2.Run(**fields))  # type: ignore[arg-type]
    return runs.CreateRun(request, timeout=10).run.name


def test_the_artifact_commands_show_versions_lineage_and_download_through_the_cache(
    *,
    takeoff: Takeoff,
    cli_env: dict[str, str],
    client: Client,
    runs: runs_pb2_grpc.RunServiceStub,
    project: str,
    tmp_path: Path,
) -> None:
    cli_env["TAKEOFF_CACHE_DIR"] = str(tmp_path / "cache")
    producer = new_run(runs, project, "producer")
    consumer = new_run(runs, project, "consumer")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.bin").write_bytes(b"m" * 5000)
    logged = client.log_artifact(tmp_path / "ckpt", "ckpt", type="checkpoint", run=producer, aliases=["best"])
    client.use_artifact("ckpt:best", run=consumer)

    listed = takeoff("artifacts", "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line.split() for line in listed.stdout.splitlines() if line.split()[:1] == ["ckpt"]]
    assert row[:5] == ["ckpt", "checkpoint", "1", "v0", "best=v0"]
    assert "no artifacts in project" in takeoff("artifacts", "list", "--type", "dataset").stdout

    described = takeoff("artifacts", "describe", "ckpt:latest")
    assert described.returncode == 0, described.stderr
    lines = [" ".join(line.split()) for line in described.stdout.splitlines()]
    assert f"version ckpt:v0 ({logged.name})" in lines
    assert "logged by producer" in lines
    assert "used by consumer" in lines
    assert any(line.startswith("model.bin 4.9 KiB") for line in lines)

    versions = takeoff("artifacts", "versions", "ckpt", "--json")
    assert [version["name"] for version in json.loads(versions.stdout)] == [logged.name]

    for fetched in (5000, 0):  # the second time, from the cache
        got = takeoff("artifacts", "get", "ckpt:v0", str(tmp_path / f"out{fetched}"), "--json")
        assert got.returncode == 0, got.stderr
        report = json.loads(got.stdout)
        assert (report["fetched_bytes"], report["directory"]) == (fetched, str(tmp_path / f"out{fetched}"))
        assert (tmp_path / f"out{fetched}" / "model.bin").read_bytes() == b"m" * 5000

    shown = takeoff("runs", "show", "consumer")
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:3] == ["used", "ckpt:v0", "checkpoint"] for line in shown.stdout.splitlines())
    shown_json = json.loads(takeoff("runs", "show", "producer", "--json").stdout)
    assert [version["name"] for version in shown_json["artifacts"]["logged"]] == [logged.name]

    missing = takeoff("artifacts", "describe", "ckpt:v7")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_runs_attempts_draws_an_items_attempts_as_segments_of_one_line(
    takeoff: Takeoff, runs: runs_pb2_grpc.RunServiceStub, project: str
) -> None:
    item = f"projects/{project}/queues/q/items/abc"
    # Each attempt's run is made after the one before ran, as the queue does: an attempt whose job never
    # started is no run to resume from.
    first, second = f"projects/{project}/runs/abc-1", f"projects/{project}/runs/abc-2"
    for attempt, name, steps, state in (
        (1, first, range(0, 4), common_pb2.RUN_STATE_KILLED),
        (2, second, range(4, 7), common_pb2.RUN_STATE_FINISHED),
    ):
        assert new_run(runs, project, name.rsplit("/", 1)[1], queue_item=item, attempt=attempt) == name
        runs.AttachRun(runs_pb2.AttachRunRequest(name=name), timeout=10)
        rows = [runs_pb2.MetricRow(step=step, values={"loss": 10.0 - step}) for step in steps]
        runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=name, rows=rows), timeout=10)
        runs.FinishRun(runs_pb2.FinishRunRequest(name=name, state=state), timeout=10)

    shown = takeoff("runs", "attempts", "abc-2", "--key", "loss")
    assert shown.returncode == 0, shown.stderr
    table = {
        line.split()[1]: line.split()
        for line in shown.stdout.splitlines()
        if line.split()[1:2] in (["abc-1"], ["abc-2"])
    }
    assert table["abc-1"][:5] == ["1", "abc-1", "KILLED", "0-3", "4"]
    assert table["abc-2"][:6] == ["2", "abc-2", "FINISHED", "4-6", "3", "abc-1"]
    [line] = [line for line in shown.stdout.splitlines() if line.split()[:1] == ["loss"]]
    left, right = line.split()[1].split("│")
    assert (left[0], right[-1]) == ("█", "▁")  # one scale across both: the loss fell from 10 to 4

    as_json = json.loads(takeoff("runs", "attempts", "abc-2", "--json").stdout)
    assert [(a["run"], a["first_step"], a["last_step"], a["resumed_from"]) for a in as_json] == [
        (first, 0, 3, ""),
        (second, 4, 6, first),
    ]
