"""``takeoff.Client`` against a real registry: versions from code, git and images; runs; errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff import (
    Client,
    CodeSource,
    CreatedJobVersion,
    Environment,
    GitSource,
    ImageSource,
    JobInputs,
    LogStream,
    RunState,
    TakeoffError,
)
from takeoff.client import UPLOAD_CHUNK_BYTES
from takeoff.errors import InvalidArgumentError, NotFoundError
from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.sdk.test_pack import write


@pytest.fixture
def runs_stub(registry: ServiceProcess) -> Iterator[runs_pb2_grpc.RunServiceStub]:
    """What an agent would use: the raw RunService, to create runs and append logs."""
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        yield runs_pb2_grpc.RunServiceStub(channel)


def test_a_directory_becomes_a_version_and_unchanged_code_is_neither_uploaded_nor_versioned_again(
    client: Client, project: str, tmp_path: Path
) -> None:
    write(tmp_path, {"train.py": "print('v0')\n", ".gitignore": "*.log\n", "debug.log": "noise"})
    inputs = JobInputs({"type": "object", "properties": {"lr": {"type": "number"}}}, {"lr": 0.1})
    environment = Environment(python_version="3.11", requirements="numpy\n")

    def create() -> CreatedJobVersion:
        return client.create_job_version(
            "train",
            tmp_path,
            entrypoint=["python", "train.py"],
            environment=environment,
            inputs=inputs,
            outputs=["loss"],
            aliases=["prod"],
        )

    first = create()
    version, artifact = first.version, first.artifact
    assert version.ref == "train:v0"
    assert not first.reused_existing
    assert artifact is not None
    assert artifact.uploaded
    assert artifact.files == (".gitignore", "train.py")
    assert version.source == CodeSource(artifact.sha256, artifact.size_bytes)
    assert (version.entrypoint, version.environment, version.inputs) == (
        ["python", "train.py"],
        environment,
        inputs,
    )
    assert version.outputs == ["loss"]
    assert sorted(version.aliases) == ["latest", "prod"]

    again = create()
    assert again.reused_existing
    assert again.artifact is not None
    assert not again.artifact.uploaded
    assert again.version.name == version.name

    write(tmp_path, {"train.py": "print('v1')\n"})
    changed = client.create_job_version("train", tmp_path, entrypoint=["python", "train.py"])
    assert changed.version.ref == "train:v1"
    assert changed.job.aliases == {"latest": 1, "prod": 0}

    assert client.get_job_version("train:prod").version == 0
    assert client.get_job_version("train").version == 1
    assert client.get_job_version(f"projects/{project}/jobs/train:v0").digest == version.digest
    assert [v.version for v in client.list_job_versions("train")] == [1, 0]
    assert client.set_alias("train", "prod", 1).aliases["prod"] == 1
    assert client.get_job("train").version_count == 2


def test_code_larger_than_one_chunk_uploads_intact(client: Client, project: str, tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(os.urandom(2_500_000))  # incompressible: three 1 MiB chunks
    artifact = client.upload_code(tmp_path)
    assert artifact.uploaded
    assert artifact.size_bytes > 2 * UPLOAD_CHUNK_BYTES

    with open_channel(client.registry, api_key=ADMIN_KEY) as channel:
        download = jobs_pb2_grpc.JobServiceStub(channel).DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=artifact.name), timeout=30
        )
        received = b"".join(part.chunk for part in download)
    assert hashlib.sha256(received).hexdigest() == artifact.sha256
    assert len(received) == artifact.size_bytes


def test_git_and_image_sources(client: Client, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write(repository, {"train.py": "print('from git')\n"})
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout

    from_git = client.create_job_version(
        "from-git", GitSource(f"file://{repository}", "main"), entrypoint=["python", "train.py"]
    ).version
    assert from_git.source == GitSource(f"file://{repository}", "main", head.strip())

    from_image = client.create_job_version("from-image", ImageSource("python:3.12-slim")).version
    assert from_image.source == ImageSource("python:3.12-slim")
    assert from_image.entrypoint == []


def test_listing_jobs_reads_every_page(client: Client) -> None:
    names = [f"job-{n:03d}" for n in range(55)]  # more than one page of the default 50
    for name in names:
        client.create_job(name)
    assert [job.id for job in client.list_jobs()] == names
    assert [job.id for job in client.list_jobs(prefix="job-05")] == names[50:]
    client.delete_job("job-054")
    assert [job.id for job in client.list_jobs(prefix="job-05")] == names[50:54]


def test_errors_carry_the_reason_and_every_field_violation(client: Client, project: str) -> None:
    client.create_job("exists")
    with pytest.raises(TakeoffError) as missing:
        client.get_job("missing")
    assert (missing.value.code, missing.value.reason) == ("NOT_FOUND", "JOB_NOT_FOUND")
    assert isinstance(missing.value, NotFoundError)
    assert str(missing.value).startswith("JOB_NOT_FOUND: ")

    with pytest.raises(TakeoffError) as duplicate:
        client.create_job("exists")
    assert duplicate.value.reason == "JOB_ALREADY_EXISTS"

    with pytest.raises(TakeoffError) as invalid:
        client.create_job("Not A Valid Id!")
    assert isinstance(invalid.value, InvalidArgumentError)
    assert invalid.value.reason == "NAME_INVALID"
    assert [violation.field for violation in invalid.value.violations] == ["job_id"]

    with pytest.raises(TakeoffError) as bad_image:
        client.create_job_version("image-job", ImageSource("UPPER CASE/not an image::"))
    assert bad_image.value.reason == "SOURCE_INVALID"
    assert bad_image.value.violations


def test_an_unreachable_registry_is_one_clear_error() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(TakeoffError) as error:
        client.get_job("anything")
    assert error.value.reason == "UNAVAILABLE"
    assert error.value.retryable
    assert "cannot reach 127.0.0.1:1" in str(error.value)


def test_runs_are_listed_by_job_and_state_and_their_logs_followed(
    client: Client, project: str, runs_stub: runs_pb2_grpc.RunServiceStub, tmp_path: Path
) -> None:
    version = client.create_job_version("train", ImageSource("python:3.12-slim")).version
    parent = f"projects/{project}"
    launched = runs_stub.CreateRun(
        runs_pb2.CreateRunRequest(
            parent=parent, run_id="launched", run=runs_pb2.Run(job_version=version.name)
        ),
        timeout=10,
    ).run
    other = runs_stub.CreateRun(runs_pb2.CreateRunRequest(parent=parent, run_id="other"), timeout=10).run
    runs_stub.FinishRun(
        runs_pb2.FinishRunRequest(name=other.name, state=common_pb2.RUN_STATE_FAILED), timeout=10
    )

    assert [run.id for run in client.list_runs()] == ["other", "launched"]  # newest first
    assert [run.id for run in client.list_runs(job="train")] == ["launched"]
    assert [run.id for run in client.list_runs(job="train:latest")] == ["launched"]
    assert [run.id for run in client.list_runs(states=[RunState.FAILED])] == ["other"]

    def append(number: int) -> None:
        stream = runs_pb2.LOG_STREAM_STDERR if number else runs_pb2.LOG_STREAM_UNSPECIFIED
        line = runs_pb2.LogLine(text=f"line {number}", stream=stream)
        runs_stub.AppendLogs(runs_pb2.AppendLogsRequest(name=launched.name, lines=[line]), timeout=10)

    # As an agent would, while the follow is open: the next line once the last one arrived, then the end.
    append(0)
    followed = []
    for line in client.read_logs("launched", follow=True):
        followed.append(line)
        if line.index < 2:
            append(line.index + 1)
        else:
            runs_stub.FinishRun(
                runs_pb2.FinishRunRequest(name=launched.name, state=common_pb2.RUN_STATE_KILLED), timeout=10
            )
    assert [(line.index, line.text, line.stream) for line in followed] == [
        (0, "line 0", LogStream.STDOUT),
        (1, "line 1", LogStream.STDERR),
        (2, "line 2", LogStream.STDERR),
    ]
    assert [line.text for line in client.read_logs("launched", tail=1)] == ["line 2"]
    assert client.get_run("launched").state is RunState.KILLED
