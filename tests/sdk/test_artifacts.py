"""Named artifacts and resume through the SDK, against a real registry: ``run.log_artifact`` /
``run.use_artifact`` in job processes, the client's lineage and cached downloads, what a run token may do,
and ``takeoff.init(resume=...)``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from takeoff import Client, ImageSource
from takeoff import _artifacts as takeoff_artifacts
from takeoff._grpc_run_calls import GrpcRunCalls
from takeoff._online import _attach, _PatientCaller
from takeoff.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.sdk.conftest import job_environment, run_job


@pytest.fixture
def runs(registry: ServiceProcess) -> Iterator[runs_pb2_grpc.RunServiceStub]:
    """The registry's RunService as the admin: runs made the way an agent makes them."""
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A blob cache of the test's own (the jobs it starts inherit it)."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("TAKEOFF_CACHE_DIR", str(directory))
    return directory


def create_run(runs: runs_pb2_grpc.RunServiceStub, project: str, run_id: str, **fields: Any) -> str:
    created = runs.CreateRun(
        runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id=run_id, run=runs_pb2.Run(**fields)),
        timeout=10,
    )
    return created.run.name


def checkpoint(directory: Path, seed: int) -> Path:
    (directory / "optimizer").mkdir(parents=True)
    (directory / "model.bin").write_bytes(os.urandom(3 * 1024 * 1024 + seed))
    (directory / "optimizer" / "state.json").write_text(json.dumps({"seed": seed}))
    return directory


def contents(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_version_logged_by_one_run_and_used_by_another_shows_lineage_and_downloads_once(
    client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str, tmp_path: Path
) -> None:
    producer = create_run(runs, project, "producer")
    consumer = create_run(runs, project, "consumer")
    source = checkpoint(tmp_path / "ckpt", seed=1)

    logged = client.log_artifact(
        source, "ckpt", type="checkpoint", run=producer, aliases=["best"], metadata={"step": 7}
    )
    assert (logged.ref, logged.run, logged.already_existed) == ("ckpt:v0", producer, False)
    assert sorted(logged.aliases) == ["best", "latest"]
    assert [file.path for file in logged.files] == ["model.bin", "optimizer/state.json"]
    assert logged.size_bytes == sum(len(data) for data in contents(source).values())
    assert logged.metadata == {"step": 7}

    used = client.use_artifact("ckpt:best", run=consumer)
    directory, fetched = client.fetch_artifact(used, tmp_path / "first")
    assert (contents(directory), fetched) == (contents(source), logged.size_bytes)
    # A second download, of the same version by another name, comes from the cache alone.
    again, fetched_again = client.fetch_artifact("ckpt:v0", tmp_path / "second")
    assert (contents(again), fetched_again) == (contents(source), 0)

    described = client.get_artifact_version("ckpt")
    assert (described.name, described.run, described.used_by) == (logged.name, producer, [consumer])
    assert [v.name for v in client.list_artifact_versions(logged_by=producer)] == [logged.name]
    assert [v.name for v in client.list_artifact_versions(used_by=consumer)] == [logged.name]
    assert client.get_artifact("ckpt").version_count == 1

    # The same contents again: the existing version, nothing new stored.
    same = client.log_artifact(source, "ckpt", type="checkpoint", run=producer)
    assert (same.name, same.already_existed) == (logged.name, True)
    (source / "optimizer" / "state.json").write_text('{"seed": 2}')
    changed = client.log_artifact(source, "ckpt", type="checkpoint", run=producer)
    assert (changed.version, changed.already_existed) == (1, False)
    assert changed.files[0] == logged.files[0]  # the model's blob is shared, not stored twice
    assert client.get_artifact("ckpt").aliases == {"latest": 1, "best": 0}


JOB_WITH_A_TOKEN = """
    import json, pathlib, takeoff
    from takeoff import Client, PermissionDeniedError

    run = takeoff.init()
    pathlib.Path("weights.bin").write_bytes(b"w" * 1000)
    mine = run.log_artifact("weights.bin", name="weights", type="model")
    shared = run.use_artifact("dataset:latest").download("data")
    try:
        Client().log_artifact("weights.bin", "weights", type="model", run="someone-else")
        other = "stored"
    except PermissionDeniedError as error:
        other = error.reason
    print(json.dumps({
        "mine": mine.name, "by": mine.run, "data": (shared / "rows.csv").read_text(), "other": other,
    }))
"""


def test_a_run_token_logs_for_its_own_run_only_and_reads_the_projects_artifacts(
    client: Client, registry: ServiceProcess, runs: runs_pb2_grpc.RunServiceStub, project: str, tmp_path: Path
) -> None:
    version = client.create_job_version("train", ImageSource("python:3.12-slim")).version.name
    run = create_run(runs, project, "tokened")
    create_run(runs, project, "someone-else")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    client.log_artifact(tmp_path / "rows.csv", "dataset", type="dataset")
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        minted = keys_pb2_grpc.KeyServiceStub(channel).MintRunToken(
            keys_pb2.MintRunTokenRequest(
                run=run, item=f"projects/{project}/queues/q/items/i", job_version=version
            ),
            timeout=10,
        )
    env = job_environment(
        registry.address,
        project,
        TAKEOFF_RUN_ID="tokened",
        TAKEOFF_TOKEN=minted.secret,
        TAKEOFF_CACHE_DIR=os.environ["TAKEOFF_CACHE_DIR"],
    )
    job = tmp_path / "job"
    job.mkdir()
    result = run_job(job, JOB_WITH_A_TOKEN, {**env, "TAKEOFF_SYSTEM_METRICS": "0"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {
        "mine": f"projects/{project}/artifactCollections/weights/versions/0",
        "by": run,
        "data": "a,b\n1,2\n",
        "other": "PERMISSION_DENIED",
    }
    assert client.get_artifact("weights").version_count == 1


RESUMING_JOB = """
    import json, takeoff

    run = takeoff.init(resume="{mode}")
    report = {{"resumed_from": run.resumed_from, "step": run.step, "best": run.summary.get("best")}}
    run.log({{"loss": 0.1}})
    run.finish()
    print(json.dumps(report))
"""


def test_a_retried_attempt_resumes_the_previous_runs_steps_and_summary(
    client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str, tmp_path: Path
) -> None:
    item = f"projects/{project}/queues/q/items/item1"
    first = create_run(runs, project, "item1-1", queue_item=item, attempt=1)
    runs.AttachRun(runs_pb2.AttachRunRequest(name=first), timeout=10)
    rows = [runs_pb2.MetricRow(step=step, values={"loss": 1 / (step + 1)}) for step in range(5)]
    runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=first, rows=rows), timeout=10)
    summary = struct_pb2.Struct()
    summary.update({"best": 0.5})
    runs.UpdateSummary(runs_pb2.UpdateSummaryRequest(name=first, summary=summary), timeout=10)
    runs.FinishRun(runs_pb2.FinishRunRequest(name=first, state=common_pb2.RUN_STATE_KILLED), timeout=10)
    second = create_run(runs, project, "item1-2", queue_item=item, attempt=2)
    assert client.get_run(second).resumed_from == first

    env = job_environment(client.registry, project, TAKEOFF_RUN_ID="item1-2")
    result = run_job(tmp_path, RESUMING_JOB.format(mode="allow"), {**env, "TAKEOFF_SYSTEM_METRICS": "0"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"resumed_from": first, "step": 5, "best": 0.5}
    [row] = client.read_metrics(second)
    assert row.step == 5
    assert client.get_run(second).summary == {"best": 0.5, "loss": 0.1}


def test_must_resume_fails_clearly_where_there_is_nothing_to_resume(
    client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str, tmp_path: Path
) -> None:
    create_run(runs, project, "first-attempt", queue_item=f"projects/{project}/queues/q/items/x", attempt=1)
    env = job_environment(client.registry, project, TAKEOFF_RUN_ID="first-attempt")
    result = run_job(tmp_path, RESUMING_JOB.format(mode="must"), env)
    assert result.returncode == 1
    assert "FailedPreconditionError: NOTHING_TO_RESUME" in result.stderr
    assert "continues no earlier attempt's run" in result.stderr
    assert client.get_run("first-attempt").state.value == "STARTING"  # nothing attached

    # Outside a launch the SDK knows at once, before making a run.
    outside = {key: value for key, value in env.items() if key != "TAKEOFF_RUN_ID"}
    result = run_job(tmp_path, RESUMING_JOB.format(mode="must"), outside)
    assert result.returncode == 1
    assert 'NOTHING_TO_RESUME: init(resume="must"): a run outside a launch resumes nothing' in result.stderr
    assert [run.id for run in client.list_runs()] == ["first-attempt"]


def test_resume_takes_the_three_modes_and_offline_runs_refuse_artifacts(
    project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import takeoff

    monkeypatch.setenv("TAKEOFF_RESUME", "sometimes")
    with pytest.raises(ValueError, match="TAKEOFF_RESUME must be one of never, allow, must"):
        takeoff.init(mode="disabled")
    monkeypatch.delenv("TAKEOFF_RESUME")
    with pytest.raises(FailedPreconditionError, match="an offline run resumes nothing"):
        takeoff.init(mode="offline", dir=tmp_path, resume="must")
    disabled = takeoff.init(mode="disabled", resume="must")
    try:
        assert disabled.resumed_from is None
        assert disabled.log_artifact(tmp_path) is None
        assert disabled.use_artifact("x") is None
        assert takeoff.log_artifact(tmp_path) is None  # the active run's
        assert takeoff.use_artifact("x") is None
    finally:
        disabled.finish()
    offline = takeoff.init(mode="offline", dir=tmp_path, project=project)
    try:
        with pytest.raises(RuntimeError, match="artifacts are stored by the registry only"):
            offline.log_artifact(tmp_path)
    finally:
        offline.finish()


def test_an_attach_retried_after_a_lost_reply_still_stores_the_resumed_summary(
    client: Client, runs: runs_pb2_grpc.RunServiceStub, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = f"projects/{project}/queues/q/items/item1"
    first = create_run(runs, project, "item1-1", queue_item=item, attempt=1)
    runs.AttachRun(runs_pb2.AttachRunRequest(name=first), timeout=10)
    summary = struct_pb2.Struct()
    summary.update({"best": 0.5})
    runs.UpdateSummary(runs_pb2.UpdateSummaryRequest(name=first, summary=summary), timeout=10)
    runs.FinishRun(runs_pb2.FinishRunRequest(name=first, state=common_pb2.RUN_STATE_KILLED), timeout=10)
    second = create_run(runs, project, "item1-2", queue_item=item, attempt=2)
    # The job's first AttachRun reached the registry; its reply did not, so the retry finds the run attached.
    runs.AttachRun(runs_pb2.AttachRunRequest(name=second, resume=runs_pb2.RESUME_MODE_ALLOW), timeout=10)
    monkeypatch.setenv("TAKEOFF_RUN_ID", "item1-2")
    caller = _PatientCaller(GrpcRunCalls(client.registry, ADMIN_KEY), deadline=time.monotonic() + 10)
    caller.retried = True
    attached, previous = _attach(
        caller, project, runs_pb2.Run(), launched=True, resume=runs_pb2.RESUME_MODE_ALLOW
    )
    assert (attached.name, previous and previous.name) == (second, first)
    assert client.get_run(second).summary == {"best": 0.5}


def test_a_version_from_a_closed_client_says_how_to_download_it(
    registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    (tmp_path / "w.bin").write_bytes(b"weights")
    with Client(registry.address, project=project) as client:
        version = client.log_artifact(tmp_path / "w.bin", "ckpt", type="checkpoint")
    with pytest.raises(RuntimeError, match=r"is closed .*run.finish\(\).*download_artifact\('ckpt:v0'\)"):
        version.download(tmp_path / "out")


@pytest.mark.parametrize("reference", ["data:", "ckpt:v" + "9" * 20, "ckpt:v2147483648"])
def test_a_reference_the_registry_cannot_parse_is_name_invalid(client: Client, reference: str) -> None:
    with pytest.raises(InvalidArgumentError, match="is not an artifact reference") as raised:
        client.get_artifact_version(reference)
    assert raised.value.reason == "NAME_INVALID"


def test_a_file_changed_while_it_is_logged_is_named_and_nothing_is_stored(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "a.bin").write_bytes(b"1" * 1000)
    (source / "b.bin").write_bytes(b"2" * 1000)
    hashed = takeoff_artifacts.upload_sources

    def rewritten_after_hashing(files: Any, missing: Any) -> Any:
        (source / "a.bin").write_bytes(b"1" * 1500)  # a training thread finished saving it meanwhile
        return hashed(files, missing)

    monkeypatch.setattr(takeoff_artifacts, "upload_sources", rewritten_after_hashing)
    with pytest.raises(FailedPreconditionError, match=r"ckpt/a\.bin changed while it was being logged"):
        client.log_artifact(source, "ckpt", type="checkpoint")
    with pytest.raises(NotFoundError):  # nothing was stored
        client.get_artifact("ckpt")
