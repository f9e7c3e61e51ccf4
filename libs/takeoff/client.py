"""``takeoff.Client``: jobs, versions, code uploads and runs over the registry's gRPC API; queues, launches
and agents over the queue service's.

    client = takeoff.Client()                       # TAKEOFF_REGISTRY, TAKEOFF_QUEUE, else the stack
    created = client.create_job_version(
        "train-mnist", Path("./mnist"), entrypoint=["python", "train.py"], aliases=["prod"]
    )
    client.create_queue("cpu", resource="local-process")
    item = client.launch("train-mnist:prod", "cpu", config={"lr": 0.01}, priority="high")
    item.wait()                                     # until SUCCEEDED, FAILED or CANCELLED
    for run in client.list_runs(job="train-mnist"):
        print(run.id, run.state, run.summary)

Every method raises :class:`takeoff.TakeoffError` (never a raw ``grpc.RpcError``); short names are
resolved in the client's project (``project=`` argument, else ``TAKEOFF_PROJECT``, else ``default``).
A run, item or key is named by its resource name, its id, or a unique prefix of its id (as tables print
them); an item needs no queue. A prefix that matches several raises :class:`InvalidArgumentError`
``ARGUMENT_INVALID`` naming them.

Every call presents an API key (see :class:`Client` for where it is found); keys and secrets are
managed here too (:meth:`Client.create_key`, :meth:`Client.set_secret`), and no method returns a
secret except the one :meth:`Client.create_key` makes, once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from takeoff._auth import channel_credentials, find_api_key
from takeoff._home import default_project, service_address
from takeoff.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    TakeoffError,
    UnavailableError,
)
from takeoff.models import (
    Agent,
    Artifact,
    ArtifactCollection,
    ArtifactFile,
    ArtifactVersion,
    CodeSource,
    CreatedJobVersion,
    CreatedKey,
    Environment,
    Item,
    ItemState,
    Job,
    JobInputs,
    JobSource,
    JobVersion,
    Key,
    KeyKind,
    LogLine,
    LogStream,
    MetricRow,
    Priority,
    ProjectRole,
    Queue,
    QueueChange,
    ResourceKind,
    RunInfo,
    RunState,
    Secret,
    SecretMount,
    ServiceRole,
    TemplateVariable,
    _mounts,
    dict_to_struct,
)
from takeoff.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    queue_pb2,
    queue_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import open_channel
from takeoff_rpc.retries import call_with_retries

if TYPE_CHECKING:
    from takeoff._artifacts import LocalFile

UPLOAD_CHUNK_BYTES = 1024 * 1024
RETRY_SECONDS = 3.0
"""How long a read, or a launch whose reply was lost, is sent again: enough for a dropped connection to come
back or to move to another replica, short enough that a service that is down is reported soon."""
RECONNECT_SECONDS = 30.0
"""How long a watch whose stream broke waits for the queue service to be back, as from a restart."""
_RESEND_POLICY = RetryPolicy(deadline=RETRY_SECONDS)
_RECONNECT_POLICY = RetryPolicy(deadline=RECONNECT_SECONDS)  # the watch loop counts the patience itself
DOWNLOAD_STREAMS = 8
"""Files of one artifact version fetched at once."""
SLOWEST_TRANSFER_BYTES_PER_SECOND = 10 * 1024 * 1024
"""An artifact transfer's deadline grows with its size at this rate, beyond the client's timeout: a
10 GiB checkpoint may take minutes, a stalled one must still end."""

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Client:
    """Connections to the registry and the queue service. Close it (or use ``with``) when done.

    What it reads from the environment when not given (see ``__init__``): ``TAKEOFF_REGISTRY_ADDRESS`` (or
    ``TAKEOFF_REGISTRY``) and ``TAKEOFF_QUEUE_ADDRESS``; ``TAKEOFF_HOME`` (default ``~/.takeoff``: the
    running stack's ``stack.json`` and ``keys/admin.key``); ``TAKEOFF_PROJECT``; ``TAKEOFF_API_KEY`` and
    ``TAKEOFF_TOKEN``; ``TAKEOFF_TLS_CA_FILE``, ``TAKEOFF_TLS_CERT_FILE`` and ``TAKEOFF_TLS_KEY_FILE``.
    Errors are :class:`takeoff.TakeoffError` subclasses (``NotFoundError``, ``InvalidArgumentError``...).
    """

    def __init__(
        self,
        registry: str | None = None,
        *,
        queue: str | None = None,
        api_key: str | None = None,
        tls: bool | grpc.ChannelCredentials | None = None,
        project: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """``registry`` and ``queue`` are the services' addresses (default: ``TAKEOFF_REGISTRY_ADDRESS``
        or ``TAKEOFF_REGISTRY``, and ``TAKEOFF_QUEUE_ADDRESS``, else the running stack's, else the default
        ports). Each may list a service's replicas, ``host:port,host:port`` (or be ``dns:///name:port``):
        calls go to the first that answers, and after it dies to the next.

        ``api_key`` is the key every call presents; without it, the first of ``TAKEOFF_API_KEY``,
        ``TAKEOFF_TOKEN`` (the run token a launched job gets) and the admin key file
        ``$TAKEOFF_HOME/keys/admin.key`` (which ``takeoff up`` writes). With none, calls fail with
        ``UNAUTHENTICATED`` ``KEY_MISSING``, whose message says how to get a key.

        ``tls``: None (the default) dials ``host:port`` addresses with TLS when ``TAKEOFF_TLS_CA_FILE``
        (the CA that signed the servers' certificates) or ``TAKEOFF_TLS_CERT_FILE`` with
        ``TAKEOFF_TLS_KEY_FILE`` (a client certificate, for mutual TLS) are set, else plaintext; True
        always uses TLS (the system's roots when no CA file is set); False never; or ``grpc`` channel
        credentials of your own. ``unix:`` addresses are always plaintext.
        """
        self.registry = registry or service_address("registry")
        self.queue_address = queue or service_address("queue")
        self.project = project or default_project()
        self.timeout = timeout
        key = find_api_key(api_key)
        self._channel = open_channel(
            self.registry, api_key=key, credentials=channel_credentials(self.registry, tls)
        )
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)
        self._keys = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._secrets = secrets_pb2_grpc.SecretServiceStub(self._channel)
        self._artifacts = artifacts_pb2_grpc.ArtifactServiceStub(self._channel)
        self._queue_channel = open_channel(
            self.queue_address, api_key=key, credentials=channel_credentials(self.queue_address, tls)
        )
        self._queues = queue_pb2_grpc.QueueServiceStub(self._queue_channel)
        self.closed = False
        """Set by :meth:`close`: the client's calls fail from then on."""

    def close(self) -> None:
        self.closed = True
        self._channel.close()
        self._queue_channel.close()

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
        response = self._call(
            self._jobs.GetJob, jobs_pb2.GetJobRequest(name=self.job_name(job, project)), repeatable=True
        )
        return Job._from_proto(response.job)

    def list_jobs(self, *, project: str | None = None, prefix: str = "") -> Iterator[Job]:
        """Every job of the project, by id; pages are fetched as the iteration goes."""
        parent = self._project_name(project)

        def page(token: str) -> tuple[Iterable[jobs_pb2.Job], str]:
            request = jobs_pb2.ListJobsRequest(parent=parent, page_token=token, job_id_prefix=prefix)
            response = self._call(self._jobs.ListJobs, request, repeatable=True)
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
        return JobVersion._from_proto(self._call(self._jobs.GetJobVersion, request, repeatable=True).version)

    def list_job_versions(self, job: str, *, project: str | None = None) -> Iterator[JobVersion]:
        """The versions of a job, newest first."""
        parent = self.job_name(job, project)

        def page(token: str) -> tuple[Iterable[common_pb2.JobVersion], str]:
            request = jobs_pb2.ListJobVersionsRequest(parent=parent, page_token=token)
            response = self._call(self._jobs.ListJobVersions, request, repeatable=True)
            return response.versions, response.next_page_token

        return (JobVersion._from_proto(version) for version in _paged(page))

    def set_alias(self, job: str, alias: str, version: int, *, project: str | None = None) -> Job:
        """Point ``alias`` at version ``version`` (the N of ``vN``), moving it if it exists."""
        request = jobs_pb2.SetJobAliasRequest(job=self.job_name(job, project), alias=alias, version=version)
        return Job._from_proto(self._call(self._jobs.SetJobAlias, request).job)

    def delete_alias(self, job: str, alias: str, *, project: str | None = None) -> Job:
        """Remove ``alias`` from the job; the version it pointed at stays."""
        request = jobs_pb2.DeleteJobAliasRequest(job=self.job_name(job, project), alias=alias)
        return Job._from_proto(self._call(self._jobs.DeleteJobAlias, request).job)

    # Code artifacts

    def upload_code(self, directory: Path, *, project: str | None = None) -> Artifact:
        """Pack ``directory`` (see ``takeoff._pack``) and upload it, unless the registry already has it."""
        # Imported here: packing needs tarfile and pathspec, which a job that only reports a run never does.
        from takeoff._pack import pack_directory

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
                if not isinstance(error, NotFoundError):
                    raise
            archive.seek(0)
            header = jobs_pb2.ArtifactUploadHeader(
                parent=parent, sha256=packed.sha256, size_bytes=packed.size_bytes
            )
            response = self._call_streaming(self._jobs.UploadArtifact, _upload_requests(header, archive))
        return replace(Artifact._from_proto(response.artifact), files=packed.members, uploaded=True)

    # Named artifacts: checkpoints, models, datasets that runs log and use

    def log_artifact(
        self,
        path: str | os.PathLike[str],
        artifact: str,
        *,
        type: str,
        run: str = "",
        aliases: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        project: str | None = None,
    ) -> ArtifactVersion:
        """Store a file or a directory as the next version of ``artifact`` (created with its first
        version) and point ``latest`` and ``aliases`` at it; returns the version, or the existing one with
        the same contents (``already_existed``).

        Files are hashed as they are read; only contents the project lacks are sent, in 1 MiB chunks, in
        one stream the registry stores whole or not at all. ``run`` (a run's name or id) records it as that
        run's output; a run token may log only for its own run. Blocks until the version is stored.
        """
        from takeoff._artifacts import local_files, upload_sources  # hashing: only artifact callers need it

        run_name = self.run_name(run, project) if run else ""
        parent = f"projects/{run_name.split('/')[1]}" if run_name else self._project_name(project)
        files = local_files(Path(path))
        missing = self._call(
            self._artifacts.FindMissingBlobs,
            artifacts_pb2.FindMissingBlobsRequest(
                parent=parent, sha256=list(dict.fromkeys(file.sha256 for file in files))
            ),
        ).missing_sha256
        sources = upload_sources(files, missing)
        header = artifacts_pb2.ArtifactVersionHeader(
            parent=parent,
            artifact=artifact,
            type=type,
            run=run_name,
            aliases=list(aliases),
            metadata=dict_to_struct(metadata) if metadata else None,
            files=[
                artifacts_pb2.ArtifactFile(path=file.path, sha256=file.sha256, size_bytes=file.size_bytes)
                for file in files
            ],
            uploads=[source.sha256 for source in sources],
            request_id=str(uuid.uuid4()),  # a stream sent again returns the version the first one stored
        )
        timeout = self._transfer_timeout(sum(source.size_bytes for source in sources))

        changed: list[TakeoffError] = []

        def send() -> artifacts_pb2.CreateArtifactVersionResponse:
            return self._artifacts.CreateArtifactVersion(
                _version_requests(header, sources, changed), timeout=timeout
            )

        try:
            response = call_with_retries(send, _RECONNECT_POLICY)
        except grpc.RpcError as error:
            if changed:  # the stream was cut short on purpose: the registry refused a partial upload
                raise changed[0] from None
            raise TakeoffError.from_rpc_error(error, target=self.registry) from None
        return ArtifactVersion._from_proto(response.version, self, response.already_existed)

    def get_artifact_version(self, reference: str, *, project: str | None = None) -> ArtifactVersion:
        """Resolve ``ckpt``, ``ckpt:latest``, ``ckpt:best``, ``ckpt:v3`` or a full name to one version,
        without recording a use."""
        request = artifacts_pb2.GetArtifactVersionRequest(name=reference, project=self._project_name(project))
        return ArtifactVersion._from_proto(
            self._call(self._artifacts.GetArtifactVersion, request, repeatable=True).version, self
        )

    def use_artifact(self, reference: str, *, run: str, project: str | None = None) -> ArtifactVersion:
        """Resolve a reference (as :meth:`get_artifact_version`) and record that ``run`` used the version
        (lineage); ``.download()`` on the result fetches its files."""
        run_name = self.run_name(run, project)
        request = artifacts_pb2.UseArtifactVersionRequest(
            name=reference, project=f"projects/{run_name.split('/')[1]}", run=run_name
        )
        return ArtifactVersion._from_proto(
            self._call(self._artifacts.UseArtifactVersion, request).version, self
        )

    def get_artifact(self, artifact: str, *, project: str | None = None) -> ArtifactCollection:
        """A named artifact: its type, version count and aliases."""
        request = artifacts_pb2.GetArtifactCollectionRequest(name=self.artifact_name(artifact, project))
        return ArtifactCollection._from_proto(
            self._call(self._artifacts.GetArtifactCollection, request, repeatable=True).collection
        )

    def list_artifacts(self, *, project: str | None = None, type: str = "") -> Iterator[ArtifactCollection]:
        """The project's named artifacts by name, only those of ``type`` if given."""
        parent = self._project_name(project)

        def page(token: str) -> tuple[Iterable[artifacts_pb2.ArtifactCollection], str]:
            request = artifacts_pb2.ListArtifactCollectionsRequest(parent=parent, page_token=token, type=type)
            response = self._call(self._artifacts.ListArtifactCollections, request, repeatable=True)
            return response.collections, response.next_page_token

        return (ArtifactCollection._from_proto(collection) for collection in _paged(page))

    def list_artifact_versions(
        self, artifact: str = "-", *, project: str | None = None, logged_by: str = "", used_by: str = ""
    ) -> Iterator[ArtifactVersion]:
        """Versions newest first: of ``artifact``, or of every artifact (``-``); only those the run
        ``logged_by`` logged, or ``used_by`` used, when given (lineage)."""
        parent = self.artifact_name(artifact, project)
        request = artifacts_pb2.ListArtifactVersionsRequest(
            parent=parent,
            logged_by=self.run_name(logged_by, project) if logged_by else "",
            used_by=self.run_name(used_by, project) if used_by else "",
        )

        def page(token: str) -> tuple[Iterable[artifacts_pb2.ArtifactVersion], str]:
            request.page_token = token
            response = self._call(self._artifacts.ListArtifactVersions, request, repeatable=True)
            return response.versions, response.next_page_token

        return (ArtifactVersion._from_proto(version, self) for version in _paged(page))

    def download_artifact(
        self, version: ArtifactVersion | str, root: str | os.PathLike[str] | None = None
    ) -> Path:
        """Put a version's files (an :class:`ArtifactVersion` or a reference) under ``root``, default
        ``./artifacts/{artifact}:v{n}``, and return it; see :meth:`ArtifactVersion.download`."""
        return self.fetch_artifact(version, root)[0]

    def fetch_artifact(
        self, version: ArtifactVersion | str, root: str | os.PathLike[str] | None = None
    ) -> tuple[Path, int]:
        """:meth:`download_artifact`, also saying how many bytes were fetched (0: the cache had all)."""
        from takeoff._artifacts import BlobCache, manifest_parts, place

        if isinstance(version, str):
            version = self.get_artifact_version(version)
        directory = (
            Path(root) if root is not None else Path("artifacts", f"{version.artifact}:v{version.version}")
        )
        cache = BlobCache()
        name = version.name
        parts = {
            file.path: manifest_parts(file.path) for file in version.files
        }  # all checked before any write
        for file in version.files:
            cache.blob(file.sha256)  # refuses a digest that is not a sha256, before any write

        def fetch_and_place(file: ArtifactFile) -> int:
            timeout = self._transfer_timeout(file.size_bytes)

            def chunks(offset: int) -> Iterator[bytes]:
                request = artifacts_pb2.ReadArtifactFileRequest(name=name, path=file.path, offset=offset)
                for message in self._artifacts.ReadArtifactFile(request, timeout=timeout):
                    if message.WhichOneof("part") == "chunk":
                        yield message.chunk

            try:  # each retry continues the partial file where the broken stream left it
                blob, count = call_with_retries(
                    lambda: cache.fetch(file.sha256, file.size_bytes, chunks), _RECONNECT_POLICY
                )
            except grpc.RpcError as error:
                raise TakeoffError.from_rpc_error(error, target=self.registry) from None
            place(blob, directory, parts[file.path])
            return count

        # Several streams at once: a small file costs a round trip more than its bytes.
        with ThreadPoolExecutor(max_workers=DOWNLOAD_STREAMS, thread_name_prefix="takeoff-download") as pool:
            fetched = sum(pool.map(fetch_and_place, version.files))
        return directory, fetched

    def artifact_name(self, artifact: str, project: str | None = None) -> str:
        """``projects/{p}/artifactCollections/{artifact}`` for an artifact id (``-``: every artifact); a
        resource name is returned as it is."""
        if artifact.startswith("projects/"):
            return artifact
        return f"{self._project_name(project)}/artifactCollections/{artifact}"

    def _transfer_timeout(self, size_bytes: int) -> float:
        return self.timeout + size_bytes / SLOWEST_TRANSFER_BYTES_PER_SECOND

    # Runs

    def get_run(self, run: str, *, project: str | None = None) -> RunInfo:
        """A run by resource name, id or unique prefix of its id."""

        def get(name: str) -> RunInfo:
            return RunInfo._from_proto(
                self._call(self._runs.GetRun, runs_pb2.GetRunRequest(name=name), repeatable=True).run
            )

        return self._exact_or_prefix(self.run_name(run, project), get, "RUN_NOT_FOUND", self._run_by_prefix)

    def list_runs(
        self,
        *,
        project: str | None = None,
        job: str = "",
        states: Sequence[RunState] = (),
        queue_item: str = "",
        id_prefix: str = "",
    ) -> Iterator[RunInfo]:
        """Runs of the project, newest first. ``job`` is a job id, a reference to one version
        (``job:v3``, ``job:prod``) or a resource name; ``id_prefix`` keeps runs whose id starts with it."""
        parent = self._project_name(project)
        job_filter = self._job_filter(job, project) if job else ""

        def page(token: str) -> tuple[Iterable[runs_pb2.Run], str]:
            request = runs_pb2.ListRunsRequest(
                parent=parent,
                page_token=token,
                job=job_filter,
                queue_item=queue_item,
                states=[state._to_proto() for state in states],
                id_prefix=id_prefix,
            )
            response = self._call(self._runs.ListRuns, request, repeatable=True)
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
        max_points: int = 0,
    ) -> Iterator[MetricRow]:
        """A run's metric rows in order; with ``follow``, new rows as they come until the run ends.

        ``max_points`` (4 to 100,000; 0 = every row) downsamples a longer history for a chart: of each of
        ``max_points / 2`` stretches of consecutive rows, the rows holding each key's minimum and maximum,
        besides the first and last row; rows that come after, while following, are sent every one.
        """
        request = runs_pb2.ReadMetricsRequest(
            name=self._stream_run_name(run, project),
            start_index=start_index,
            keys=list(keys),
            follow=follow,
            max_points=max_points,
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
            name=self._stream_run_name(run, project),
            start_index=start_index,
            tail=tail,
            streams=[stream._to_proto() for stream in streams],
            follow=follow,
        )
        for response in self._stream(self._runs.ReadLogs, request, follow=follow):
            yield from (LogLine._from_proto(line) for line in response.lines)

    # Queues

    def create_queue(
        self,
        queue_id: str,
        *,
        resource: ResourceKind | str = ResourceKind.LOCAL_PROCESS,
        resource_config: Mapping[str, Any] | None = None,
        template_variables: Mapping[str, TemplateVariable | Mapping[str, Any]] | None = None,
        prioritization: bool = False,
        max_attempts: int = 0,
        retry_job_failures: bool = False,
        retry_delay: timedelta | float | None = None,
        start_timeout: timedelta | float | None = None,
        max_run_time: timedelta | float | None = None,
        concurrency_limit: int = 0,
        paused: bool = False,
        description: str = "",
        container_name: str = "",
        secure: bool = False,
        allow_host_paths: bool = False,
        secrets: Sequence[SecretMount | str] = (),
        project: str | None = None,
        request_id: str = "",
    ) -> Queue:
        """Create a queue for one kind of resource: ``local-process``, ``local-container``,
        ``kubernetes``, ``slurm`` or ``ray``.

        ``resource_config`` is the default every item gets (items' overrides merge over it); it may hold
        ``{{name}}`` holes for ``template_variables``, each a JSON Schema (its ``description`` is shown to
        people) or a :class:`TemplateVariable`. Times are timedeltas or seconds; left out: no retry delay, a
        30 minute start timeout, no max run time (0 also means none). ``max_attempts`` 0 means 3 and
        ``concurrency_limit`` 0 means no limit.
        """
        queue = _queue_message(
            {
                "resource_config": resource_config,
                "template_variables": template_variables,
                "prioritization": prioritization,
                "max_attempts": max_attempts,
                "retry_job_failures": retry_job_failures,
                "retry_delay": retry_delay,
                "start_timeout": start_timeout,
                "max_run_time": max_run_time,
                "concurrency_limit": concurrency_limit,
                "paused": paused,
                "description": description,
                "container_name": container_name,
                "secure": secure,
                "allow_host_paths": allow_host_paths,
                "secrets": secrets,
            }
        )
        queue.resource = ResourceKind(resource)._to_proto()
        request = queue_pb2.CreateQueueRequest(
            parent=self._project_name(project), queue_id=queue_id, queue=queue, request_id=request_id
        )
        return Queue._from_proto(self._queue_call(self._queues.CreateQueue, request).queue)

    def get_queue(self, queue: str, *, project: str | None = None) -> Queue:
        """A queue by id or resource name, with its item counts."""
        request = queue_pb2.GetQueueRequest(name=self.queue_name(queue, project))
        return Queue._from_proto(self._queue_call(self._queues.GetQueue, request, repeatable=True).queue)

    def list_queues(
        self, *, project: str | None = None, resource: ResourceKind | str | None = None
    ) -> Iterator[Queue]:
        """The queues of the project (of one resource kind, if given), by id."""
        parent = self._project_name(project)
        kind = ResourceKind(resource)._to_proto() if resource else common_pb2.RESOURCE_KIND_UNSPECIFIED

        def page(token: str) -> tuple[Iterable[queue_pb2.Queue], str]:
            request = queue_pb2.ListQueuesRequest(parent=parent, page_token=token, resource=kind)
            response = self._queue_call(self._queues.ListQueues, request, repeatable=True)
            return response.queues, response.next_page_token

        return (Queue._from_proto(queue) for queue in _paged(page))

    def update_queue(self, queue: str, *, project: str | None = None, **changes: Any) -> Queue:
        """Change the settings given, named as in :meth:`create_queue` (the resource kind is fixed); one
        given as None goes back to its default.

        Dispatch settings (paused, prioritization, concurrency_limit, start_timeout, retry_job_failures,
        retry_delay) apply at once, also to waiting items; the others to items launched afterwards.
        """
        if not changes:
            raise TypeError("update_queue() needs at least one setting to change")
        message = _queue_message(changes)
        message.name = self.queue_name(queue, project)
        request = queue_pb2.UpdateQueueRequest(
            queue=message, update_mask=field_mask_pb2.FieldMask(paths=sorted(changes))
        )
        return Queue._from_proto(self._queue_call(self._queues.UpdateQueue, request).queue)

    def pause_queue(self, queue: str, *, project: str | None = None) -> Queue:
        """Stop assigning the queue's items; it still takes launches, and running items carry on."""
        return self.update_queue(queue, project=project, paused=True)

    def resume_queue(self, queue: str, *, project: str | None = None) -> Queue:
        return self.update_queue(queue, project=project, paused=False)

    def delete_queue(self, queue: str, *, force: bool = False, project: str | None = None) -> None:
        """Delete a queue and its items; one with items not yet ended needs ``force``, which stops them."""
        request = queue_pb2.DeleteQueueRequest(name=self.queue_name(queue, project), force=force)
        self._queue_call(self._queues.DeleteQueue, request)

    # Launches and items

    def launch(
        self,
        job: str,
        queue: str,
        *,
        config: Mapping[str, Any] | None = None,
        template_variables: Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.MEDIUM,
        entrypoint: Sequence[str] | None = None,
        resource_config: Mapping[str, Any] | None = None,
        max_attempts: int = 0,
        max_run_time: timedelta | float | None = None,
        run_name: str = "",
        secrets: Sequence[SecretMount | str] = (),
        project: str | None = None,
        request_id: str | None = None,
    ) -> Item:
        """Put a job on a queue; returns the PENDING item, a handle to :meth:`Item.wait` on.

        ``job`` (``train``, ``train:prod``, ``train:v3`` or a resource name, in the queue's project) is
        pinned to one version now. ``config`` is the run config, checked against the version's inputs with
        their defaults filled in; ``template_variables`` fill the queue's ``{{name}}`` holes;
        ``resource_config`` is merged over the queue's. ``max_attempts`` 0 and ``max_run_time`` None take
        the queue's. ``secrets`` are given to the job besides the queue's (:class:`SecretMount` records
        or ``SECRET=ENV`` / ``SECRET:file=NAME`` strings). A call whose reply is lost is sent again with
        the same ``request_id`` (a new UUID unless given), which returns the first item: one call never
        launches twice.
        """
        request = queue_pb2.EnqueueRequest(
            queue=self.queue_name(queue, project),
            job=job,
            run_config=None if config is None else dict_to_struct(config),
            entrypoint=list(entrypoint or ()),
            resource_config=None if resource_config is None else dict_to_struct(resource_config),
            template_variables=None if template_variables is None else dict_to_struct(template_variables),
            priority=Priority(priority)._to_proto(),
            max_attempts=max_attempts,
            max_run_time=_duration(max_run_time),
            run_display_name=run_name,
            request_id=request_id or str(uuid.uuid4()),
            secrets=_mounts(secrets),
        )
        return Item._from_proto(self._queue_call(self._queues.Enqueue, request, repeatable=True).item, self)

    def get_item(self, item: str, *, queue: str | None = None, project: str | None = None) -> Item:
        """An item with its transition history; ``item`` as :meth:`item_name` takes it, or with a unique
        prefix of its id."""

        def get(name: str) -> Item:
            request = queue_pb2.GetItemRequest(name=name)
            return Item._from_proto(
                self._queue_call(self._queues.GetItem, request, repeatable=True).item, self
            )

        name = self.item_name(item, queue, project)
        return self._exact_or_prefix(name, get, "ITEM_NOT_FOUND", self._item_by_prefix)

    def list_items(
        self,
        *,
        queue: str | None = None,
        states: Sequence[ItemState | str] = (),
        id_prefix: str = "",
        project: str | None = None,
    ) -> Iterator[Item]:
        """Items of one queue, else of every queue of the project, newest first; ``states`` and
        ``id_prefix`` (items whose id starts with it) filter."""
        parent = self.queue_name(queue or "-", project)  # queue "-" stands for all of them
        wanted = [ItemState(state)._to_proto() for state in states]

        def page(token: str) -> tuple[Iterable[queue_pb2.Item], str]:
            request = queue_pb2.ListItemsRequest(
                parent=parent, page_token=token, states=wanted, id_prefix=id_prefix
            )
            response = self._queue_call(self._queues.ListItems, request, repeatable=True)
            return response.items, response.next_page_token

        return (Item._from_proto(item, self) for item in _paged(page))

    def cancel_item(
        self, item: str, *, message: str = "", queue: str | None = None, project: str | None = None
    ) -> Item:
        """Cancel an item: a PENDING one ends CANCELLED at once; a leased one is marked, its agent told
        to stop, and it ends CANCELLED when the agent has (it is never retried)."""

        def cancel(name: str) -> Item:
            request = queue_pb2.CancelItemRequest(name=name, message=message)
            return Item._from_proto(self._queue_call(self._queues.CancelItem, request).item, self)

        return self._on_item(item, queue, project, cancel)

    def relaunch_item(
        self,
        item: str,
        *,
        queue: str | None = None,
        project: str | None = None,
        request_id: str | None = None,
    ) -> Item:
        """A new item with the same pinned version and inputs as an ended one, on the same queue."""
        request_id = request_id or str(uuid.uuid4())

        def relaunch(name: str) -> Item:
            request = queue_pb2.RelaunchItemRequest(name=name, request_id=request_id)
            return Item._from_proto(
                self._queue_call(self._queues.RelaunchItem, request, repeatable=True).item, self
            )

        return self._on_item(item, queue, project, relaunch)

    def watch_item(
        self,
        item: str,
        *,
        queue: str | None = None,
        project: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Item]:
        """The item now, then after every change as the queue pushes it, until it ends.

        A stream lost to a restarting queue service is opened again once the service is back (the first
        message of a stream is the item as it is then, so nothing is missed). Raises ``TimeoutError``
        after ``timeout`` seconds.
        """
        name = self._item_in_its_queue(item, queue, project)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnects, lost_since = 0, None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{name} has not ended after {timeout}s")
            call = self._queues.WatchItem(queue_pb2.WatchItemRequest(name=name), timeout=remaining)
            try:
                for response in call:
                    lost_since, reconnects = None, 0
                    current = Item._from_proto(response.item, self)
                    yield current
                    if current.ended:
                        return
                lost: TakeoffError = UnavailableError("UNAVAILABLE", "UNAVAILABLE", "the watch ended early")
            except grpc.RpcError as rpc_error:
                lost = TakeoffError.from_rpc_error(rpc_error, target=self.queue_address)
            finally:
                call.cancel()  # a caller that stops iterating early must not leave the stream open
            if isinstance(lost, DeadlineExceededError) and deadline is not None:
                raise TimeoutError(f"{name} has not ended after {timeout}s") from None
            lost_since = lost_since or time.monotonic()
            reconnects += 1
            self._wait_for_queue_service(
                lost, give_up_at=lost_since + RECONNECT_SECONDS, reconnects=reconnects, deadline=deadline
            )

    def watch_queue(self, queue: str, *, project: str | None = None) -> Generator[QueueChange, None, None]:
        """A queue's open items and agents as they change, until the caller stops iterating: first the
        whole view (``snapshot``), then each change as the queue pushes it (at most five a second). Keep
        a :class:`takeoff.QueueView` current with them.

        A stream lost to a restarting queue service is opened again once the service is back, starting
        with a new snapshot; a queue deleted meanwhile raises ``NotFoundError`` ``QUEUE_NOT_FOUND``.
        """
        name = self.queue_name(queue, project)
        reconnects, lost_since = 0, None
        while True:
            call = self._queues.WatchQueue(queue_pb2.WatchQueueRequest(name=name))
            try:
                for change in self._queue_changes(call):
                    lost_since, reconnects = None, 0
                    yield change
                lost: TakeoffError = UnavailableError("UNAVAILABLE", "UNAVAILABLE", "the watch ended early")
            except grpc.RpcError as rpc_error:
                lost = TakeoffError.from_rpc_error(rpc_error, target=self.queue_address)
            finally:
                call.cancel()  # a caller that stops iterating must not leave the stream open
            lost_since = lost_since or time.monotonic()
            reconnects += 1
            self._wait_for_queue_service(
                lost, give_up_at=lost_since + RECONNECT_SECONDS, reconnects=reconnects
            )

    def _queue_changes(self, call: Iterable[queue_pb2.WatchQueueResponse]) -> Iterator[QueueChange]:
        """The changes of one WatchQueue stream, the messages of its snapshot joined into one."""
        snapshot: QueueChange | None = None
        for response in call:
            change = QueueChange._from_proto(response, self)
            if not change.snapshot:
                yield change
                continue
            if snapshot is None:
                snapshot = change
            else:
                snapshot.items.extend(change.items)
                snapshot.agents.extend(change.agents)
            if response.snapshot_done:
                yield snapshot
                snapshot = None

    def _wait_for_queue_service(
        self, lost: TakeoffError, *, give_up_at: float, reconnects: int, deadline: float | None = None
    ) -> None:
        """After a watch stream was lost: raise ``lost`` unless it may pass and ``give_up_at`` (a
        monotonic time) is ahead; else wait a while, and for the service's channel to be ready again (no
        longer than ``deadline``)."""
        patience = give_up_at - time.monotonic()
        # Only the watch loops cancel their calls, once stopped: a CANCELLED here came from the far side.
        if not (lost.retryable or lost.code == "CANCELLED") or patience <= 0:
            raise lost
        time.sleep(_RECONNECT_POLICY.delay(reconnects))  # the channel may not have seen its connection go yet
        limit = patience if deadline is None else min(patience, deadline - time.monotonic())
        with contextlib.suppress(grpc.FutureTimeoutError):  # still down: the next round says so
            grpc.channel_ready_future(self._queue_channel).result(timeout=max(0.0, limit))

    # Agents

    def list_agents(
        self, *, queue: str | None = None, include_disconnected: bool = False, project: str | None = None
    ) -> Iterator[Agent]:
        """Connected agents (of one queue, if given), by id; ``include_disconnected`` adds those gone
        whose leases have not expired yet."""
        queue_filter = self.queue_name(queue, project) if queue else ""

        def page(token: str) -> tuple[Iterable[queue_pb2.Agent], str]:
            request = queue_pb2.ListAgentsRequest(
                page_token=token, queue=queue_filter, include_disconnected=include_disconnected
            )
            response = self._queue_call(self._queues.ListAgents, request, repeatable=True)
            return response.agents, response.next_page_token

        return (Agent._from_proto(agent) for agent in _paged(page))

    # Keys

    def create_key(
        self,
        kind: KeyKind | str,
        *,
        projects: Sequence[str] = (),
        role: ProjectRole | str | None = None,
        queues: Sequence[str] = (),
        service: ServiceRole | str | None = None,
        key_id: str = "",
        display_name: str = "",
    ) -> CreatedKey:
        """Create a key and return it with its secret, which nothing returns again.

        ``admin`` keys may do everything; ``project`` keys need ``projects`` (ids or ``projects/{p}``) and
        a ``role`` (``read``, or ``write`` for read and write); ``agent`` keys need ``queues`` (ids in the
        client's project, or resource names); ``service`` keys a ``service`` (``queue``, ``builder``,
        ``console``). ``key_id`` names the key (else one is generated): a retry with the same id fails
        with ALREADY_EXISTS instead of making a second key.
        """
        key = keys_pb2.Key(
            kind=KeyKind(kind)._to_proto(),
            display_name=display_name,
            projects=[p if p.startswith("projects/") else f"projects/{p}" for p in projects],
            queues=[self.queue_name(queue) for queue in queues],
        )
        if role is not None:
            key.role = ProjectRole(role)._to_proto()
        if service is not None:
            key.service = ServiceRole(service)._to_proto()
        response = self._call(self._keys.CreateKey, keys_pb2.CreateKeyRequest(key=key, key_id=key_id))
        return CreatedKey(Key._from_proto(response.key), response.secret)

    def get_key(self, key: str) -> Key:
        """A key by id, ``keys/{key}`` or unique prefix of its id (never its secret)."""

        def get(name: str) -> Key:
            return Key._from_proto(
                self._call(self._keys.GetKey, keys_pb2.GetKeyRequest(name=name), repeatable=True).key
            )

        return self._exact_or_prefix(_key_name(key), get, "KEY_NOT_FOUND", self._key_by_prefix)

    def list_keys(self, *, show_revoked: bool = False, show_run_tokens: bool = False) -> Iterator[Key]:
        """Keys, oldest first (never their secrets); revoked keys and run tokens only when asked for."""

        def page(token: str) -> tuple[Iterable[keys_pb2.Key], str]:
            request = keys_pb2.ListKeysRequest(
                page_token=token, show_revoked=show_revoked, show_run_tokens=show_run_tokens
            )
            response = self._call(self._keys.ListKeys, request, repeatable=True)
            return response.keys, response.next_page_token

        return (Key._from_proto(key) for key in _paged(page))

    def revoke_key(self, key: str) -> Key:
        """Revoke a key (by id, ``keys/{key}`` or unique prefix of its id): every service refuses it
        within 5 seconds, its open streams included."""

        def revoke(name: str) -> Key:
            return Key._from_proto(self._call(self._keys.RevokeKey, keys_pb2.RevokeKeyRequest(name=name)).key)

        return self._exact_or_prefix(_key_name(key), revoke, "KEY_NOT_FOUND", self._key_by_prefix)

    # Secrets

    def set_secret(self, secret_id: str, value: bytes | str, *, project: str | None = None) -> Secret:
        """Create the project's secret ``secret_id``, or replace its value (at most 64 KiB; text is
        UTF-8). Nothing reads the value back but the jobs given it."""
        request = secrets_pb2.SetSecretRequest(
            parent=self._project_name(project),
            secret_id=secret_id,
            value=value.encode() if isinstance(value, str) else value,
        )
        return Secret._from_proto(self._call(self._secrets.SetSecret, request).secret)

    def list_secrets(self, *, project: str | None = None) -> Iterator[Secret]:
        """The project's secrets by id, without values."""
        parent = self._project_name(project)

        def page(token: str) -> tuple[Iterable[secrets_pb2.Secret], str]:
            request = secrets_pb2.ListSecretsRequest(parent=parent, page_token=token)
            response = self._call(self._secrets.ListSecrets, request, repeatable=True)
            return response.secrets, response.next_page_token

        return (Secret._from_proto(secret) for secret in _paged(page))

    def delete_secret(self, secret: str, *, project: str | None = None) -> None:
        """Delete a secret; attempts already given it keep what they received."""
        request = secrets_pb2.DeleteSecretRequest(name=self.secret_name(secret, project))
        self._call(self._secrets.DeleteSecret, request)

    # Names

    def secret_name(self, secret: str, project: str | None = None) -> str:
        """``projects/{p}/secrets/{secret}`` for a secret id; a resource name is returned as it is."""
        return secret if secret.startswith("projects/") else f"{self._project_name(project)}/secrets/{secret}"

    def queue_name(self, queue: str, project: str | None = None) -> str:
        """``projects/{p}/queues/{queue}`` for a queue id; a resource name is returned as it is."""
        return queue if queue.startswith("projects/") else f"{self._project_name(project)}/queues/{queue}"

    def item_name(self, item: str, queue: str | None = None, project: str | None = None) -> str:
        """An item's resource name from itself, from ``QUEUE/ITEM_ID``, or from an item id and its queue;
        without a queue, queue ``-``, which GetItem searches whole (item ids are unique in a project)."""
        if item.startswith("projects/"):
            return item
        queue_id, _, item_id = item.rpartition("/")
        return f"{self.queue_name(queue_id or queue or '-', project)}/items/{item_id}"

    def job_name(self, job: str, project: str | None = None) -> str:
        """``projects/{p}/jobs/{job}`` for a job id; a resource name is returned as it is."""
        return job if job.startswith("projects/") else f"{self._project_name(project)}/jobs/{job}"

    def run_name(self, run: str, project: str | None = None) -> str:
        """``projects/{p}/runs/{run}`` for a run id; a resource name is returned as it is."""
        return run if run.startswith("projects/") else f"{self._project_name(project)}/runs/{run}"

    def _stream_run_name(self, run: str, project: str | None) -> str:
        """The run a stream reads: a resource name as it is; an id or a prefix, looked up first, since a
        stream cannot be sent again once it has failed as a call can."""
        name = self.run_name(run, project)
        return name if run.startswith("projects/") else self.get_run(name).name

    def _on_item(
        self, item: str, queue: str | None, project: str | None, call: Callable[[str], _Result]
    ) -> _Result:
        """``call`` on the item's resource name, or on the one item whose id starts with its id."""
        name = self._item_in_its_queue(item, queue, project)
        return self._exact_or_prefix(name, call, "ITEM_NOT_FOUND", self._item_by_prefix)

    def _item_in_its_queue(self, item: str, queue: str | None, project: str | None) -> str:
        """The item's resource name with its queue: one in any queue (``-``) is looked up, as only GetItem
        searches every queue."""
        name = self.item_name(item, queue, project)
        return self.get_item(name).name if "/queues/-/" in name else name

    def _exact_or_prefix(
        self,
        name: str,
        call: Callable[[str], _Result],
        missing: str,
        by_prefix: Callable[[str], list[str]],
    ) -> _Result:
        """``call(name)``; when nothing has that name (``missing``: the NOT_FOUND reason), ``call`` on the one
        resource whose id starts with the name's id (``by_prefix`` lists up to two such names)."""
        try:
            return call(name)
        except NotFoundError as error:
            if error.reason != missing:
                raise
            not_found = error
        try:
            matches = by_prefix(name)
        except InvalidArgumentError:  # the service says no id it makes starts so
            raise not_found from None
        if not matches:
            raise not_found
        if len(matches) > 1:
            kind = missing.removesuffix("_NOT_FOUND").lower()
            ids = ", ".join(_last_segment(match) for match in matches)
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                "ARGUMENT_INVALID",
                f"{kind} prefix {_last_segment(name)!r} matches several {kind}s: {ids}; give more characters",
            )
        return call(matches[0])

    def _run_by_prefix(self, name: str) -> list[str]:
        parent, _, prefix = name.rpartition("/runs/")
        request = runs_pb2.ListRunsRequest(parent=parent, id_prefix=prefix, page_size=_PREFIX_MATCHES)
        return _starting_with(
            name, (run.name for run in self._call(self._runs.ListRuns, request, repeatable=True).runs)
        )

    def _item_by_prefix(self, name: str) -> list[str]:
        parent, _, prefix = name.rpartition("/items/")
        request = queue_pb2.ListItemsRequest(parent=parent, id_prefix=prefix, page_size=_PREFIX_MATCHES)
        items = self._queue_call(self._queues.ListItems, request, repeatable=True).items
        return _starting_with(name, (item.name for item in items))

    def _key_by_prefix(self, name: str) -> list[str]:
        # ListKeys has no prefix filter: an installation has tens of keys, not thousands.
        keys = self.list_keys(show_revoked=True, show_run_tokens=True)
        return _starting_with(name, (key.name for key in keys))[:_PREFIX_MATCHES]

    def _project_name(self, project: str | None) -> str:
        return f"projects/{project or self.project}"

    def _job_filter(self, job: str, project: str | None) -> str:
        """ListRuns filters by a job or a version name; a ``job:alias`` reference names a version."""
        if ":" in job or "/versions/" in job:
            return self.get_job_version(job, project=project).name
        return self.job_name(job, project)

    # Calls

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        *,
        target: str | None = None,
        repeatable: bool = False,
    ) -> _Response:
        """One call. A ``repeatable`` one (a read, or a change carrying a request_id, whose repeat returns
        what the first did) is sent again while its failure may pass, as when a replica was just killed."""
        try:
            if repeatable:
                return call_with_retries(lambda: method(request, timeout=self.timeout), _RESEND_POLICY)
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise TakeoffError.from_rpc_error(error, target=target or self.registry) from None

    def _queue_call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        *,
        repeatable: bool = False,
    ) -> _Response:
        return self._call(method, request, target=self.queue_address, repeatable=repeatable)

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


_PREFIX_MATCHES = 2
"""How many resources a prefix lookup asks for: enough to tell one match from several."""


def _starting_with(name: str, names: Iterable[str]) -> list[str]:
    """The ``names`` whose id starts with the id of ``name``; checked here too, as a service older than
    the ``id_prefix`` filter ignores it and lists everything."""
    prefix = _last_segment(name)
    return [candidate for candidate in names if _last_segment(candidate).startswith(prefix)]


def _last_segment(name: str) -> str:
    """The id at the end of a resource name."""
    return name.rsplit("/", 1)[-1]


def _key_name(key: str) -> str:
    return key if key.startswith("keys/") else f"keys/{key}"


def _queue_message(settings: Mapping[str, Any]) -> queue_pb2.Queue:
    """A Queue message holding ``settings`` (named as its fields); a None setting is left unset."""
    unknown = sorted(set(settings) - set(_QUEUE_SETTINGS))
    if unknown:
        raise TypeError(f"not queue settings: {', '.join(unknown)}; they are {', '.join(_QUEUE_SETTINGS)}")
    return queue_pb2.Queue(
        **{name: _QUEUE_SETTINGS[name](value) for name, value in settings.items() if value is not None}
    )


def _as_is(value: Any) -> Any:
    return value


def _template_variables(
    variables: Mapping[str, TemplateVariable | Mapping[str, Any]],
) -> dict[str, queue_pb2.TemplateVariable]:
    """Each variable as given, or made from its JSON Schema, whose ``description`` describes it."""
    return {
        name: (
            spec
            if isinstance(spec, TemplateVariable)
            else TemplateVariable(dict(spec), spec.get("description", ""))
        )._to_proto()
        for name, spec in variables.items()
    }


def _duration(span: timedelta | float | None) -> duration_pb2.Duration | None:
    if span is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromTimedelta(span if isinstance(span, timedelta) else timedelta(seconds=span))
    return duration


def _run_time_limit(span: timedelta | float) -> duration_pb2.Duration | None:
    """The API says "no limit" by leaving the field unset, and refuses a zero."""
    return _duration(span) if span else None


# The settings a queue is created or updated with, by field name, and how each becomes its field.
_QUEUE_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "description": _as_is,
    "resource_config": dict_to_struct,
    "template_variables": _template_variables,
    "prioritization": _as_is,
    "max_attempts": _as_is,
    "retry_job_failures": _as_is,
    "retry_delay": _duration,
    "start_timeout": _duration,
    "max_run_time": _run_time_limit,
    "concurrency_limit": _as_is,
    "paused": _as_is,
    "container_name": _as_is,
    "secure": _as_is,
    "allow_host_paths": _as_is,
    "secrets": _mounts,
}


def _upload_requests(
    header: jobs_pb2.ArtifactUploadHeader, archive: BinaryIO
) -> Iterator[jobs_pb2.UploadArtifactRequest]:
    yield jobs_pb2.UploadArtifactRequest(header=header)
    while chunk := archive.read(UPLOAD_CHUNK_BYTES):
        yield jobs_pb2.UploadArtifactRequest(chunk=chunk)


def _version_requests(
    header: artifacts_pb2.ArtifactVersionHeader, sources: Sequence[LocalFile], changed: list[TakeoffError]
) -> Iterator[artifacts_pb2.CreateArtifactVersionRequest]:
    """The CreateArtifactVersion stream: the manifest, then the missing contents in chunks. A file changed
    since it was hashed ends the stream early, its error put in ``changed``: gRPC would only log an error
    raised here, and the registry stores nothing from a stream short of its uploads."""
    from takeoff._artifacts import upload_chunks

    yield artifacts_pb2.CreateArtifactVersionRequest(header=header)
    try:
        for chunk in upload_chunks(sources):
            yield artifacts_pb2.CreateArtifactVersionRequest(chunk=chunk)
    except TakeoffError as error:
        changed.append(error)
