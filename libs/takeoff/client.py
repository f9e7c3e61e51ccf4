"""``takeoff.Client``: jobs, versions, code uploads and runs, as plain Python over the registry's gRPC API.

    client = takeoff.Client()                       # TAKEOFF_REGISTRY, else the running stack
    created = client.create_job_version(
        "train-mnist", Path("./mnist"), entrypoint=["python", "train.py"], aliases=["prod"]
    )
    for run in client.list_runs(job="train-mnist"):
        print(run.id, run.state, run.summary)

Every method raises :class:`takeoff.TakeoffError` (never a raw ``grpc.RpcError``); short names are
resolved in the client's project (``project=`` argument, else ``TAKEOFF_PROJECT``, else ``default``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, TypeVar

import grpc

from takeoff._channel import open_channel
from takeoff._home import service_address
from takeoff._pack import pack_directory
from takeoff.errors import TakeoffError
from takeoff.models import (
    Artifact,
    CodeSource,
    CreatedJobVersion,
    Environment,
    Job,
    JobInputs,
    JobSource,
    JobVersion,
    LogLine,
    LogStream,
    MetricRow,
    RunInfo,
    RunState,
)
from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc

DEFAULT_PROJECT = "default"
UPLOAD_CHUNK_BYTES = 1024 * 1024

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")


def default_project() -> str:
    """``TAKEOFF_PROJECT`` (set for every launched job), else ``default``."""
    return os.environ.get("TAKEOFF_PROJECT") or DEFAULT_PROJECT


class Client:
    """A connection to the registry. Close it (or use ``with``) when done."""

    def __init__(
        self,
        registry: str | None = None,
        *,
        api_key: str | None = None,
        project: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.registry = registry or service_address("registry")
        self.project = project or default_project()
        self.timeout = timeout
        self._channel = open_channel(self.registry, api_key=api_key)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # Jobs

    def create_job(self, job_id: str, *, description: str = "", project: str | None = None) -> Job:
        """Create an empty job; most callers create a version directly (which creates the job as needed)."""
        response = self._call(
            self._jobs.CreateJob,
            jobs_pb2.CreateJobRequest(
                parent=self._project_name(project), job_id=job_id, job=jobs_pb2.Job(description=description)
            ),
        )
        return Job._from_proto(response.job)

    def get_job(self, job: str, *, project: str | None = None) -> Job:
        """A job by id or resource name."""
        response = self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(name=self.job_name(job, project)))
        return Job._from_proto(response.job)

    def list_jobs(self, *, project: str | None = None, prefix: str = "") -> Iterator[Job]:
        """Every job of the project, by id; pages are fetched as the iteration goes."""
        parent = self._project_name(project)

        def page(token: str) -> tuple[Iterable[jobs_pb2.Job], str]:
            request = jobs_pb2.ListJobsRequest(parent=parent, page_token=token, job_id_prefix=prefix)
            response = self._call(self._jobs.ListJobs, request)
            return response.jobs, response.next_page_token

        return (Job._from_proto(job) for job in _paged(page))

    def delete_job(self, job: str, *, project: str | None = None) -> None:
        self._call(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(name=self.job_name(job, project)))

    def create_job_version(
        self,
        job: str,
        source: os.PathLike[str] | JobSource,
        *,
        entrypoint: Sequence[str] = (),
        environment: Environment | None = None,
        inputs: JobInputs | None = None,
        outputs: Sequence[str] = (),
        description: str = "",
        aliases: Sequence[str] = (),
        project: str | None = None,
        request_id: str = "",
    ) -> CreatedJobVersion:
        """Create the next version of ``job`` (creating the job if needed) and point ``latest`` at it.

        ``source`` is a directory (packed, then uploaded unless the registry has it already), a
        :class:`GitSource` or an :class:`ImageSource`. When nothing differs from the newest version, that
        version is returned with ``reused_existing`` set.
        """
        job_name = self.job_name(job, project)
        artifact = None
        if isinstance(source, os.PathLike):
            artifact = self.upload_code(Path(source), project=job_name.split("/")[1])
            source = CodeSource(artifact.sha256)
        version = common_pb2.JobVersion(
            source=source._to_proto(),
            entrypoint=list(entrypoint),
            inputs=(inputs or JobInputs())._to_proto(),
            outputs=common_pb2.JobOutputs(metrics=list(outputs)),
            environment=(environment or Environment())._to_proto(),
            description=description,
        )
        response = self._call(
            self._jobs.CreateJobVersion,
            jobs_pb2.CreateJobVersionRequest(
                parent=job_name,
                version=version,
                aliases=list(aliases),
                allow_missing=True,
                request_id=request_id,
            ),
        )
        return CreatedJobVersion(
            JobVersion._from_proto(response.version),
            Job._from_proto(response.job),
            response.reused_existing,
            artifact,
        )

    def get_job_version(self, reference: str, *, project: str | None = None) -> JobVersion:
        """Resolve ``job``, ``job:alias``, ``job:vN`` or a full name to one version."""
        request = jobs_pb2.GetJobVersionRequest(name=reference, project=self._project_name(project))
        return JobVersion._from_proto(self._call(self._jobs.GetJobVersion, request).version)

    def list_job_versions(self, job: str, *, project: str | None = None) -> Iterator[JobVersion]:
        """The versions of a job, newest first."""
        parent = self.job_name(job, project)

        def page(token: str) -> tuple[Iterable[common_pb2.JobVersion], str]:
            request = jobs_pb2.ListJobVersionsRequest(parent=parent, page_token=token)
            response = self._call(self._jobs.ListJobVersions, request)
            return response.versions, response.next_page_token

        return (JobVersion._from_proto(version) for version in _paged(page))

    def set_alias(self, job: str, alias: str, version: int, *, project: str | None = None) -> Job:
        """Point ``alias`` at version ``version`` (the N of ``vN``), moving it if it exists."""
        request = jobs_pb2.SetJobAliasRequest(job=self.job_name(job, project), alias=alias, version=version)
        return Job._from_proto(self._call(self._jobs.SetJobAlias, request).job)

    # Code artifacts

    def upload_code(self, directory: Path, *, project: str | None = None) -> Artifact:
        """Pack ``directory`` (see ``takeoff._pack``) and upload it, unless the registry already has it."""
        parent = self._project_name(project)
        with tempfile.TemporaryFile() as archive:
            packed = pack_directory(directory, archive)
            try:
                existing = self._call(
                    self._jobs.GetArtifact,
                    jobs_pb2.GetArtifactRequest(name=f"{parent}/artifacts/{packed.sha256}"),
                )
                return replace(Artifact._from_proto(existing.artifact), files=packed.members)
            except TakeoffError as error:
                if error.code is not grpc.StatusCode.NOT_FOUND:
                    raise
            archive.seek(0)
            header = jobs_pb2.ArtifactUploadHeader(
                parent=parent, sha256=packed.sha256, size_bytes=packed.size_bytes
            )
            response = self._call_streaming(self._jobs.UploadArtifact, _upload_requests(header, archive))
        return replace(Artifact._from_proto(response.artifact), files=packed.members, uploaded=True)

    # Runs

    def get_run(self, run: str, *, project: str | None = None) -> RunInfo:
        """A run by id or resource name."""
        response = self._call(self._runs.GetRun, runs_pb2.GetRunRequest(name=self.run_name(run, project)))
        return RunInfo._from_proto(response.run)

    def list_runs(
        self,
        *,
        project: str | None = None,
        job: str = "",
        states: Sequence[RunState] = (),
        queue_item: str = "",
    ) -> Iterator[RunInfo]:
        """Runs of the project, newest first. ``job`` is a job id, a reference to one version
        (``job:v3``, ``job:prod``) or a resource name."""
        parent = self._project_name(project)
        job_filter = self._job_filter(job, project) if job else ""

        def page(token: str) -> tuple[Iterable[runs_pb2.Run], str]:
            request = runs_pb2.ListRunsRequest(
                parent=parent,
                page_token=token,
                job=job_filter,
                queue_item=queue_item,
                states=[state._to_proto() for state in states],
            )
            response = self._call(self._runs.ListRuns, request)
            return response.runs, response.next_page_token

        return (RunInfo._from_proto(run) for run in _paged(page))

    def read_metrics(
        self,
        run: str,
        *,
        project: str | None = None,
        start_index: int = 0,
        keys: Sequence[str] = (),
        follow: bool = False,
    ) -> Iterator[MetricRow]:
        """A run's metric rows in order; with ``follow``, new rows as they come until the run ends."""
        request = runs_pb2.ReadMetricsRequest(
            name=self.run_name(run, project), start_index=start_index, keys=list(keys), follow=follow
        )
        for response in self._stream(self._runs.ReadMetrics, request, follow=follow):
            yield from (MetricRow._from_proto(row) for row in response.rows)

    def read_logs(
        self,
        run: str,
        *,
        project: str | None = None,
        start_index: int = 0,
        tail: int = 0,
        streams: Sequence[LogStream] = (),
        follow: bool = False,
    ) -> Iterator[LogLine]:
        """A run's log lines in order (the last ``tail`` ones if > 0); with ``follow``, until the run ends."""
        request = runs_pb2.ReadLogsRequest(
            name=self.run_name(run, project),
            start_index=start_index,
            tail=tail,
            streams=[stream._to_proto() for stream in streams],
            follow=follow,
        )
        for response in self._stream(self._runs.ReadLogs, request, follow=follow):
            yield from (LogLine._from_proto(line) for line in response.lines)

    # Names

    def job_name(self, job: str, project: str | None = None) -> str:
        """``projects/{p}/jobs/{job}`` for a job id; a resource name is returned as it is."""
        return job if job.startswith("projects/") else f"{self._project_name(project)}/jobs/{job}"

    def run_name(self, run: str, project: str | None = None) -> str:
        """``projects/{p}/runs/{run}`` for a run id; a resource name is returned as it is."""
        return run if run.startswith("projects/") else f"{self._project_name(project)}/runs/{run}"

    def _project_name(self, project: str | None) -> str:
        return f"projects/{project or self.project}"

    def _job_filter(self, job: str, project: str | None) -> str:
        """ListRuns filters by a job or a version name; a ``job:alias`` reference names a version."""
        if ":" in job or "/versions/" in job:
            return self.get_job_version(job, project=project).name
        return self.job_name(job, project)

    # Calls

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise TakeoffError.from_rpc_error(error, target=self.registry) from None

    def _call_streaming(
        self, method: grpc.StreamUnaryMultiCallable[_Request, _Response], requests: Iterator[_Request]
    ) -> _Response:
        try:
            return method(requests, timeout=self.timeout)
        except grpc.RpcError as error:
            raise TakeoffError.from_rpc_error(error, target=self.registry) from None

    def _stream(
        self, method: grpc.UnaryStreamMultiCallable[_Request, _Response], request: _Request, *, follow: bool
    ) -> Iterator[_Response]:
        call = method(request, timeout=None if follow else self.timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise TakeoffError.from_rpc_error(error, target=self.registry) from None
        finally:
            call.cancel()  # a caller that stops iterating early must not leave a followed stream open


def _paged(fetch_page: Callable[[str], tuple[Iterable[_Item], str]]) -> Iterator[_Item]:
    token = ""
    while True:
        items, token = fetch_page(token)
        yield from items
        if not token:
            return


def _upload_requests(
    header: jobs_pb2.ArtifactUploadHeader, archive: BinaryIO
) -> Iterator[jobs_pb2.UploadArtifactRequest]:
    yield jobs_pb2.UploadArtifactRequest(header=header)
    while chunk := archive.read(UPLOAD_CHUNK_BYTES):
        yield jobs_pb2.UploadArtifactRequest(chunk=chunk)
