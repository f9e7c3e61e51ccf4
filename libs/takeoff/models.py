"""Plain Python records of what the registry and the queue store, converted to and from the v1 protos.

The client returns these instead of generated messages: their fields have Python types (``datetime``,
``dict``, enums), unset timestamps are ``None``, and free-form JSON is a ``dict``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from google.protobuf import duration_pb2, timestamp_pb2

from takeoff._values import RunState, dict_to_struct, jsonable, struct_to_dict
from takeoff.v1 import artifacts_pb2, common_pb2, jobs_pb2, keys_pb2, queue_pb2, runs_pb2, secrets_pb2

if TYPE_CHECKING:
    from takeoff.client import Client


class LogStream(enum.StrEnum):
    """Which output a log line came from."""

    STDOUT = "STDOUT"
    STDERR = "STDERR"
    SYSTEM = "SYSTEM"
    BUILD = "BUILD"

    @classmethod
    def _from_proto(cls, value: runs_pb2.LogStream.ValueType) -> LogStream:
        if value == runs_pb2.LOG_STREAM_UNSPECIFIED:
            return cls.STDOUT
        return cls(runs_pb2.LogStream.Name(value).removeprefix("LOG_STREAM_"))

    def _to_proto(self) -> runs_pb2.LogStream.ValueType:
        return runs_pb2.LogStream.Value(f"LOG_STREAM_{self.value}")


@dataclass(frozen=True)
class CodeSource:
    """Code uploaded to the registry as a tarball; ``Client.upload_code`` makes one from a directory."""

    sha256: str
    size_bytes: int = 0

    def _to_proto(self) -> common_pb2.JobSource:
        return common_pb2.JobSource(code=common_pb2.CodeSource(sha256=self.sha256))


@dataclass(frozen=True)
class GitSource:
    """A git repository; the registry resolves ``ref`` (empty = the default branch) to ``commit``."""

    url: str
    ref: str = ""
    commit: str = ""

    def _to_proto(self) -> common_pb2.JobSource:
        return common_pb2.JobSource(git=common_pb2.GitSource(url=self.url, ref=self.ref))


@dataclass(frozen=True)
class ImageSource:
    """A prebuilt container image, e.g. ``python:3.12-slim``."""

    reference: str

    def _to_proto(self) -> common_pb2.JobSource:
        return common_pb2.JobSource(image=common_pb2.ImageSource(reference=self.reference))


JobSource = CodeSource | GitSource | ImageSource


def _source_from_proto(message: common_pb2.JobSource) -> JobSource:
    match message.WhichOneof("source"):
        case "code":
            return CodeSource(message.code.sha256, message.code.size_bytes)
        case "git":
            return GitSource(message.git.url, message.git.ref, message.git.commit)
        case "image":
            return ImageSource(message.image.reference)
    raise ValueError("the registry returned a job version without a source")


@dataclass(frozen=True)
class Environment:
    """What a build needs: python version, requirements text, base image, Dockerfile, build context."""

    python_version: str = ""
    requirements: str = ""
    base_image: str = ""
    dockerfile: str = ""
    build_context: str = ""

    @classmethod
    def _from_proto(cls, message: common_pb2.Environment) -> Self:
        return cls(
            message.python_version,
            message.requirements,
            message.base_image,
            message.dockerfile,
            message.build_context,
        )

    def _to_proto(self) -> common_pb2.Environment:
        return common_pb2.Environment(
            python_version=self.python_version,
            requirements=self.requirements,
            base_image=self.base_image,
            dockerfile=self.dockerfile,
            build_context=self.build_context,
        )


@dataclass(frozen=True)
class JobInputs:
    """The config a job accepts: a JSON Schema (None = any object) and default values."""

    schema: dict[str, Any] | None = None
    defaults: dict[str, Any] | None = None

    @classmethod
    def _from_proto(cls, message: common_pb2.JobInputs) -> Self:
        return cls(
            struct_to_dict(message.schema) if message.HasField("schema") else None,
            struct_to_dict(message.defaults) if message.HasField("defaults") else None,
        )

    def _to_proto(self) -> common_pb2.JobInputs:
        return common_pb2.JobInputs(
            schema=None if self.schema is None else dict_to_struct(self.schema),
            defaults=None if self.defaults is None else dict_to_struct(self.defaults),
        )


class _InProject:
    """A resource named ``projects/{project}/.../{id}``: its id and project, read off the name."""

    name: str

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def project(self) -> str:
        return self.name.split("/")[1]


@dataclass(frozen=True)
class Job(_InProject):
    """A named task in a project; its content lives in its versions."""

    name: str
    description: str = ""
    version_count: int = 0
    latest_version: str = ""
    aliases: dict[str, int] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None

    @classmethod
    def _from_proto(cls, message: jobs_pb2.Job) -> Self:
        return cls(
            name=message.name,
            description=message.description,
            version_count=message.version_count,
            latest_version=message.latest_version,
            aliases=dict(message.aliases),
            create_time=_time(message, "create_time"),
            update_time=_time(message, "update_time"),
        )


@dataclass(frozen=True)
class JobVersion:
    """One immutable version of a job: everything needed to build and run it."""

    name: str
    version: int
    source: JobSource
    entrypoint: list[str] = field(default_factory=list)
    inputs: JobInputs = field(default_factory=JobInputs)
    outputs: list[str] = field(default_factory=list)
    environment: Environment = field(default_factory=Environment)
    description: str = ""
    aliases: list[str] = field(default_factory=list)
    digest: str = ""
    create_time: datetime | None = None

    @property
    def job(self) -> str:
        """The job's resource name, ``projects/{p}/jobs/{j}``."""
        return self.name.rsplit("/versions/", 1)[0]

    @property
    def ref(self) -> str:
        """The short reference people type, ``job:vN``."""
        return f"{self.job.rsplit('/', 1)[-1]}:v{self.version}"

    @classmethod
    def _from_proto(cls, message: common_pb2.JobVersion) -> Self:
        return cls(
            name=message.name,
            version=message.version,
            source=_source_from_proto(message.source),
            entrypoint=list(message.entrypoint),
            inputs=JobInputs._from_proto(message.inputs),
            outputs=list(message.outputs.metrics),
            environment=Environment._from_proto(message.environment),
            description=message.description,
            aliases=list(message.aliases),
            digest=message.digest,
            create_time=_time(message, "create_time"),
        )


@dataclass(frozen=True)
class CreatedJobVersion:
    """What creating a version returned: the version, the job after it, and whether nothing changed."""

    version: JobVersion
    job: Job
    reused_existing: bool
    """True when the content equalled the newest version's, so that version was returned instead."""
    artifact: Artifact | None = None
    """The uploaded code, for versions made from a directory."""


@dataclass(frozen=True)
class Artifact:
    """A content-addressed code tarball stored by the registry."""

    name: str
    sha256: str
    size_bytes: int
    create_time: datetime | None = None
    uploaded: bool = False
    """True when this client sent the bytes; False when the registry had them already."""
    files: tuple[str, ...] = ()
    """The packed paths, when this client packed the artifact."""

    @classmethod
    def _from_proto(cls, message: jobs_pb2.Artifact) -> Self:
        return cls(message.name, message.sha256, message.size_bytes, _time(message, "create_time"))


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact version: its path inside the version, sha256 and size."""

    path: str
    sha256: str
    size_bytes: int

    @classmethod
    def _from_proto(cls, message: artifacts_pb2.ArtifactFile) -> Self:
        return cls(message.path, message.sha256, message.size_bytes)


@dataclass(frozen=True)
class ArtifactCollection(_InProject):
    """A named artifact (``ckpt``, ``mnist-train``): the versions runs logged under one name."""

    name: str
    type: str = ""
    version_count: int = 0
    aliases: dict[str, int] = field(default_factory=dict)
    """Every alias, ``latest`` included, and the version number it points at."""
    create_time: datetime | None = None
    update_time: datetime | None = None

    @classmethod
    def _from_proto(cls, message: artifacts_pb2.ArtifactCollection) -> Self:
        return cls(
            name=message.name,
            type=message.type,
            version_count=message.version_count,
            aliases=dict(message.aliases),
            create_time=_time(message, "create_time"),
            update_time=_time(message, "update_time"),
        )


@dataclass(frozen=True)
class ArtifactVersion:
    """One immutable version of a named artifact, as ``run.log_artifact`` stored it and
    ``run.use_artifact`` returns it: ``version.download()`` puts its files in a directory and returns it.

    ``run`` is the run that logged it; ``used_by`` the runs that used it (lineage both ways).
    """

    name: str
    """``projects/{p}/artifactCollections/{a}/versions/{n}``."""
    version: int
    type: str = ""
    digest: str = ""
    """sha256 over the manifest: equal digests, equal contents."""
    size_bytes: int = 0
    files: list[ArtifactFile] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    used_by: list[str] = field(default_factory=list)
    use_count: int = 0
    create_time: datetime | None = None
    already_existed: bool = False
    """From ``log_artifact``: the contents equalled an existing version's, which was returned instead."""
    _client: Client | None = field(default=None, repr=False, compare=False)

    @property
    def artifact(self) -> str:
        """The artifact id (``ckpt``)."""
        return self.name.split("/")[3]

    @property
    def project(self) -> str:
        return self.name.split("/")[1]

    @property
    def ref(self) -> str:
        """The short reference people type, ``ckpt:v3``."""
        return f"{self.artifact}:v{self.version}"

    def download(self, root: str | Path | None = None) -> Path:
        """Put the version's files under ``root`` (default ``./artifacts/{artifact}:v{n}``) and return it.

        Files come from the local cache (``TAKEOFF_CACHE_DIR``, else ``~/.cache/takeoff``), keyed by their
        sha256, and are fetched into it first when missing, resuming a partial download; so a second
        download, of this or any version sharing files, fetches nothing. The files are copies (a reflink
        where the file system can): writing into one changes neither the cache nor other downloads.

        The client or run that returned the version must still be open: a version a run gave, after
        ``run.finish()``, raises a RuntimeError saying how to download it.
        """
        if self._client is None:
            raise RuntimeError(f"{self.ref} was not fetched through a takeoff.Client or a run")
        if self._client.closed:
            raise RuntimeError(
                f"cannot download {self.ref}: the client or run it came from is closed (a run closes its "
                f"connection at run.finish()); download it before that, or with "
                f"takeoff.Client(project={self.project!r}).download_artifact({self.ref!r})"
            )
        return self._client.download_artifact(self, root)

    @classmethod
    def _from_proto(
        cls,
        message: artifacts_pb2.ArtifactVersion,
        client: Client | None = None,
        already_existed: bool = False,
    ) -> Self:
        return cls(
            name=message.name,
            version=message.version,
            type=message.type,
            digest=message.digest,
            size_bytes=message.size_bytes,
            files=[ArtifactFile._from_proto(file) for file in message.files],
            aliases=list(message.aliases),
            metadata=struct_to_dict(message.metadata),
            run=message.run,
            used_by=list(message.used_by),
            use_count=message.use_count,
            create_time=_time(message, "create_time"),
            already_existed=already_existed,
            _client=client,
        )


@dataclass(frozen=True)
class RunInfo(_InProject):
    """A tracked run as the registry records it (without its metric history and logs)."""

    name: str
    state: RunState
    display_name: str = ""
    job_version: str = ""
    queue_item: str = ""
    attempt: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    create_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    update_time: datetime | None = None
    exit_code: int | None = None
    message: str = ""
    history_length: int = 0
    last_step: int = 0
    metric_keys: list[str] = field(default_factory=list)
    log_line_count: int = 0
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    group: str = ""
    job_type: str = ""
    launch_config_keys: list[str] = field(default_factory=list)
    """The config keys the launch set; the job cannot change them."""
    resumed_from: str = ""
    """The run this one continues (the item's previous attempt's), ``projects/{p}/runs/{r}``; empty for a
    first attempt and outside a launch."""

    @classmethod
    def _from_proto(cls, message: runs_pb2.Run) -> Self:
        return cls(
            name=message.name,
            state=RunState._from_proto(message.state),
            display_name=message.display_name,
            job_version=message.job_version,
            queue_item=message.queue_item,
            attempt=message.attempt,
            config=struct_to_dict(message.config),
            summary=struct_to_dict(message.summary),
            create_time=_time(message, "create_time"),
            start_time=_time(message, "start_time"),
            end_time=_time(message, "end_time"),
            update_time=_time(message, "update_time"),
            exit_code=message.exit_code if message.HasField("exit_code") else None,
            message=message.message,
            history_length=message.history_length,
            last_step=message.last_step,
            metric_keys=list(message.metric_keys),
            log_line_count=message.log_line_count,
            tags=list(message.tags),
            notes=message.notes,
            group=message.group,
            job_type=message.job_type,
            launch_config_keys=list(message.launch_config_keys),
            resumed_from=message.resumed_from,
        )


@dataclass(frozen=True)
class MetricRow:
    """One ``run.log`` call as stored: numeric ``values`` and non-numeric ``data``."""

    index: int
    step: int
    time: datetime | None = None
    values: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, message: runs_pb2.MetricRow) -> Self:
        return cls(
            message.index,
            message.step,
            _time(message, "time"),
            dict(message.values),
            struct_to_dict(message.data),
        )


@dataclass(frozen=True)
class LogLine:
    """One line of a run's log."""

    index: int
    text: str
    stream: LogStream = LogStream.STDOUT
    time: datetime | None = None
    rank: int | None = None
    """In a multi-node launch, the rank that printed it; None for a job of one process, the agent's and
    the build's lines."""

    @classmethod
    def _from_proto(cls, message: runs_pb2.LogLine) -> Self:
        return cls(
            message.index,
            message.text,
            LogStream._from_proto(message.stream),
            _time(message, "time"),
            message.rank if message.HasField("rank") else None,
        )


class _AnyCase(enum.StrEnum):
    """Found by value in any case, with ``-`` or ``_``: ``"high"``, ``"HIGH"`` and ``Priority.HIGH`` agree."""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if not isinstance(value, str):
            return None
        wanted = _spelling(value)
        return next((member for member in cls if _spelling(member.value) == wanted), None)


def _spelling(value: str) -> str:
    return value.lower().replace("_", "-")


class ItemState(_AnyCase):
    """State of a queue item; SUCCEEDED, FAILED and CANCELLED are final."""

    PENDING = "PENDING"
    LEASED = "LEASED"
    BUILDING = "BUILDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in (ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED)

    @property
    def live(self) -> bool:
        """Held by an agent (LEASED..RUNNING): what a queue's concurrency limit counts."""
        return self in (ItemState.LEASED, ItemState.BUILDING, ItemState.STARTING, ItemState.RUNNING)

    @classmethod
    def _from_proto(cls, value: common_pb2.ItemState.ValueType) -> ItemState:
        return cls(common_pb2.ItemState.Name(value).removeprefix("ITEM_STATE_"))

    def _to_proto(self) -> common_pb2.ItemState.ValueType:
        return common_pb2.ItemState.Value(f"ITEM_STATE_{self.value}")


class Priority(_AnyCase):
    """Priority of a queue item; a queue with prioritization on serves the higher ones first."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @classmethod
    def _from_proto(cls, value: common_pb2.Priority.ValueType) -> Priority:
        if value == common_pb2.PRIORITY_UNSPECIFIED:
            return cls.MEDIUM
        return cls[common_pb2.Priority.Name(value).removeprefix("PRIORITY_")]

    def _to_proto(self) -> common_pb2.Priority.ValueType:
        return common_pb2.Priority.Value(f"PRIORITY_{self.name}")


class ResourceKind(_AnyCase):
    """What a queue's items run on."""

    LOCAL_PROCESS = "local-process"
    LOCAL_CONTAINER = "local-container"
    KUBERNETES = "kubernetes"
    SLURM = "slurm"
    RAY = "ray"

    @classmethod
    def _from_proto(cls, value: common_pb2.ResourceKind.ValueType) -> ResourceKind:
        return cls[common_pb2.ResourceKind.Name(value).removeprefix("RESOURCE_KIND_")]

    def _to_proto(self) -> common_pb2.ResourceKind.ValueType:
        return common_pb2.ResourceKind.Value(f"RESOURCE_KIND_{self.name}")


class FailureReason(_AnyCase):
    """Why an attempt ended without success. AGENT_LOST, BUILD_INFRA, PREEMPTED, START_TIMEOUT,
    RUNNER_INFRA and RELEASED are the infrastructure's fault and retried; the job's own failures only when
    the queue says so; CANCELLED never."""

    AGENT_LOST = "AGENT_LOST"
    BUILD_INFRA = "BUILD_INFRA"
    PREEMPTED = "PREEMPTED"
    START_TIMEOUT = "START_TIMEOUT"
    RUNNER_INFRA = "RUNNER_INFRA"
    RELEASED = "RELEASED"
    MAX_RUN_TIME_EXCEEDED = "MAX_RUN_TIME_EXCEEDED"
    JOB_FAILED = "JOB_FAILED"
    NO_RUN = "NO_RUN"
    BUILD_FAILED = "BUILD_FAILED"
    CONFIG_INVALID = "CONFIG_INVALID"
    CANCELLED = "CANCELLED"

    @classmethod
    def _from_proto(cls, value: common_pb2.FailureReason.ValueType) -> FailureReason | None:
        if value == common_pb2.FAILURE_REASON_UNSPECIFIED:
            return None
        return cls(common_pb2.FailureReason.Name(value).removeprefix("FAILURE_REASON_"))


class PendingReason(_AnyCase):
    """Why a PENDING item is not running yet (``Item.pending_reason``), the first that holds in this order."""

    QUEUE_PAUSED = "QUEUE_PAUSED"
    RETRY_BACKOFF = "RETRY_BACKOFF"
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
    NO_AGENT = "NO_AGENT"
    AGENTS_BUSY = "AGENTS_BUSY"
    WAITING_FOR_GPUS = "WAITING_FOR_GPUS"
    QUEUED = "QUEUED"

    @classmethod
    def _from_proto(cls, value: queue_pb2.PendingReason.ValueType) -> PendingReason | None:
        if value == queue_pb2.PENDING_REASON_UNSPECIFIED:
            return None
        return cls(queue_pb2.PendingReason.Name(value).removeprefix("PENDING_REASON_"))


@dataclass(frozen=True)
class TemplateVariable:
    """A typed hole ``{{name}}`` in a queue's resource config: a JSON Schema with a ``type``, and maybe a
    ``default``, ``minimum``, ``maximum``, ``enum``; a variable without a default must be given at launch."""

    schema: dict[str, Any]
    description: str = ""

    @classmethod
    def _from_proto(cls, message: queue_pb2.TemplateVariable) -> Self:
        return cls(struct_to_dict(message.schema), message.description)

    def _to_proto(self) -> queue_pb2.TemplateVariable:
        return queue_pb2.TemplateVariable(schema=dict_to_struct(self.schema), description=self.description)


@dataclass(frozen=True)
class SecretMount:
    """A secret given to a job: as the environment variable ``env`` or as the file ``file`` (relative to
    the job's ``TAKEOFF_SECRETS_DIR``); exactly one of them. ``secret`` is a short id in the queue's
    project or ``projects/{p}/secrets/{s}``.

    :meth:`parse` reads the command line's spelling: ``SECRET=ENV`` or ``SECRET:file=NAME``.
    """

    secret: str
    env: str = ""
    file: str = ""

    def __post_init__(self) -> None:
        if not self.secret or bool(self.env) == bool(self.file):
            raise ValueError("a secret mount names a secret and exactly one of env and file")

    @classmethod
    def parse(cls, text: str) -> SecretMount:
        """``SECRET=ENV`` (an environment variable) or ``SECRET:file=NAME`` (a file); ValueError else."""
        target, equals, value = text.partition("=")
        if not equals or not target or not value:
            raise ValueError(f"{text!r} is not SECRET=ENV or SECRET:file=NAME")
        secret, colon, kind = target.partition(":")
        if not colon:
            return cls(secret, env=value)
        if kind != "file" or not secret:
            raise ValueError(f"{text!r} is not SECRET=ENV or SECRET:file=NAME")
        return cls(secret, file=value)

    def __str__(self) -> str:
        return f"{self.secret}={self.env}" if self.env else f"{self.secret}:file={self.file}"

    @classmethod
    def _from_proto(cls, message: queue_pb2.SecretMount) -> Self:
        return cls(message.secret, env=message.env, file=message.file)

    def _to_proto(self) -> queue_pb2.SecretMount:
        return queue_pb2.SecretMount(secret=self.secret, env=self.env, file=self.file)


def _mounts(given: Sequence[SecretMount | str]) -> list[queue_pb2.SecretMount]:
    """Secret mounts as given, a string spelled as :meth:`SecretMount.parse` reads it."""
    return [(m if isinstance(m, SecretMount) else SecretMount.parse(m))._to_proto() for m in given]


class KeyKind(_AnyCase):
    """What a key is for: ``admin`` (everything), ``project`` (read, or read and write, in listed
    projects), ``agent`` (lease listed queues), ``service`` (one Takeoff service), ``run`` (a run token)."""

    ADMIN = "admin"
    PROJECT = "project"
    AGENT = "agent"
    SERVICE = "service"
    RUN = "run"

    @classmethod
    def _from_proto(cls, value: keys_pb2.KeyKind.ValueType) -> KeyKind | None:
        if value == keys_pb2.KEY_KIND_UNSPECIFIED:
            return None
        return cls[keys_pb2.KeyKind.Name(value).removeprefix("KEY_KIND_")]

    def _to_proto(self) -> keys_pb2.KeyKind.ValueType:
        return keys_pb2.KeyKind.Value(f"KEY_KIND_{self.name}")


class ProjectRole(_AnyCase):
    """What a project key may do in its projects: ``read``, or ``write`` (read and write)."""

    READ = "read"
    WRITE = "write"

    @classmethod
    def _from_proto(cls, value: keys_pb2.ProjectRole.ValueType) -> ProjectRole | None:
        if value == keys_pb2.PROJECT_ROLE_UNSPECIFIED:
            return None
        return cls[keys_pb2.ProjectRole.Name(value).removeprefix("PROJECT_ROLE_")]

    def _to_proto(self) -> keys_pb2.ProjectRole.ValueType:
        return keys_pb2.ProjectRole.Value(f"PROJECT_ROLE_{self.name}")


class ServiceRole(_AnyCase):
    """The Takeoff service a service key is for."""

    QUEUE = "queue"
    BUILDER = "builder"
    CONSOLE = "console"

    @classmethod
    def _from_proto(cls, value: keys_pb2.ServiceRole.ValueType) -> ServiceRole | None:
        if value == keys_pb2.SERVICE_ROLE_UNSPECIFIED:
            return None
        return cls[keys_pb2.ServiceRole.Name(value).removeprefix("SERVICE_ROLE_")]

    def _to_proto(self) -> keys_pb2.ServiceRole.ValueType:
        return keys_pb2.ServiceRole.Value(f"SERVICE_ROLE_{self.name}")


@dataclass(frozen=True)
class Key:
    """An API key or run token, never with its secret: ``secret_hint`` (``tko_`` and the key id) tells
    keys apart. ``permissions`` lists what it may do, one ``permission on scope`` each."""

    name: str
    kind: KeyKind | None
    display_name: str = ""
    projects: list[str] = field(default_factory=list)
    role: ProjectRole | None = None
    queues: list[str] = field(default_factory=list)
    service: ServiceRole | None = None
    run: str = ""
    item: str = ""
    job_version: str = ""
    secrets: list[str] = field(default_factory=list)
    secret_hint: str = ""
    creator: str = ""
    create_time: datetime | None = None
    revoke_time: datetime | None = None
    permissions: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.name.removeprefix("keys/")

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None

    @classmethod
    def _from_proto(cls, message: keys_pb2.Key) -> Self:
        return cls(
            name=message.name,
            kind=KeyKind._from_proto(message.kind),
            display_name=message.display_name,
            projects=list(message.projects),
            role=ProjectRole._from_proto(message.role),
            queues=list(message.queues),
            service=ServiceRole._from_proto(message.service),
            run=message.run,
            item=message.item,
            job_version=message.job_version,
            secrets=list(message.secrets),
            secret_hint=message.secret_hint,
            creator=message.creator,
            create_time=_time(message, "create_time"),
            revoke_time=_time(message, "revoke_time"),
            permissions=list(message.permissions),
        )


@dataclass(frozen=True)
class CreatedKey:
    """A key just created and its secret, which no later call returns (and ``repr`` does not show)."""

    key: Key
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Secret(_InProject):
    """A project's secret, by name; its value is never read back."""

    name: str
    create_time: datetime | None = None
    update_time: datetime | None = None

    @classmethod
    def _from_proto(cls, message: secrets_pb2.Secret) -> Self:
        return cls(
            name=message.name,
            create_time=_time(message, "create_time"),
            update_time=_time(message, "update_time"),
        )


@dataclass(frozen=True)
class Queue(_InProject):
    """A queue of work for one kind of target resource, with the settings its items get."""

    name: str
    resource: ResourceKind
    description: str = ""
    resource_config: dict[str, Any] = field(default_factory=dict)
    """The default resource config; items' overrides are deep-merged over it."""
    template_variables: dict[str, TemplateVariable] = field(default_factory=dict)
    prioritization: bool = False
    max_attempts: int = 0
    retry_job_failures: bool = False
    retry_delay: timedelta = timedelta(0)
    start_timeout: timedelta | None = None
    max_run_time: timedelta | None = None
    """None: unlimited."""
    concurrency_limit: int = 0
    """0: unlimited."""
    paused: bool = False
    container_name: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    item_counts: dict[ItemState, int] = field(default_factory=dict)
    agent_count: int = 0
    """Connected agents serving the queue."""
    secure: bool = False
    """Items may not override the entrypoint or dangerous resource options (each refused by name)."""
    allow_host_paths: bool = False
    """The queue's own resource config may mount host paths."""
    secrets: list[SecretMount] = field(default_factory=list)
    """Secrets every item's job receives."""

    @classmethod
    def _from_proto(cls, message: queue_pb2.Queue) -> Self:
        return cls(
            name=message.name,
            resource=ResourceKind._from_proto(message.resource),
            description=message.description,
            resource_config=struct_to_dict(message.resource_config),
            template_variables={
                name: TemplateVariable._from_proto(variable)
                for name, variable in sorted(message.template_variables.items())
            },
            prioritization=message.prioritization,
            max_attempts=message.max_attempts,
            retry_job_failures=message.retry_job_failures,
            retry_delay=_span(message, "retry_delay") or timedelta(0),
            start_timeout=_span(message, "start_timeout"),
            max_run_time=_span(message, "max_run_time"),
            concurrency_limit=message.concurrency_limit,
            paused=message.paused,
            container_name=message.container_name,
            create_time=_time(message, "create_time"),
            update_time=_time(message, "update_time"),
            item_counts={state: getattr(message.item_counts, state.value.lower()) for state in ItemState},
            agent_count=message.agent_count,
            secure=message.secure,
            allow_host_paths=message.allow_host_paths,
            secrets=[SecretMount._from_proto(mount) for mount in message.secrets],
        )


@dataclass(frozen=True)
class ItemTransition:
    """One recorded change of an item's state; ``from_state`` is None for the enqueue."""

    time: datetime | None
    from_state: ItemState | None
    to_state: ItemState
    reason: FailureReason | None = None
    message: str = ""
    agent: str = ""
    attempt: int = 0
    epoch: int = 0
    run: str = ""
    actor: str = ""
    """Who caused it (Enqueue, CancelItem, RelaunchItem): ``keys/{key}`` and its display name; empty
    for what the system did."""

    @classmethod
    def _from_proto(cls, message: queue_pb2.ItemTransition) -> Self:
        return cls(
            time=_time(message, "time"),
            from_state=(
                None
                if message.from_state == common_pb2.ITEM_STATE_UNSPECIFIED
                else ItemState._from_proto(message.from_state)
            ),
            to_state=ItemState._from_proto(message.to_state),
            reason=FailureReason._from_proto(message.reason),
            message=message.message,
            agent=message.agent,
            attempt=message.attempt,
            epoch=message.epoch,
            run=message.run,
            actor=message.actor,
        )


@dataclass
class Item(_InProject):
    """One launch of a job version on a queue, and a handle on it: :meth:`refresh`, :meth:`cancel` and
    :meth:`wait` update this object in place (and return it).

    ``run`` is the run of the latest attempt (empty until an agent takes the item); ``reason``,
    ``message`` and ``exit_code`` say how the last attempt ended.
    """

    name: str
    state: ItemState
    job: str = ""
    """The job reference as given, e.g. ``train:latest``."""
    job_version: str = ""
    """The version it was pinned to at launch, ``projects/{p}/jobs/{j}/versions/{n}``."""
    priority: Priority = Priority.MEDIUM
    run_config: dict[str, Any] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    resource_config_override: dict[str, Any] = field(default_factory=dict)
    template_variables: dict[str, Any] = field(default_factory=dict)
    resource_config: dict[str, Any] = field(default_factory=dict)
    """What the runner gets: the queue's default and the override merged, template variables filled."""
    attempt: int = 0
    max_attempts: int = 0
    max_run_time: timedelta | None = None
    run_display_name: str = ""
    cancel_requested: bool = False
    run: str = ""
    agent: str = ""
    reason: FailureReason | None = None
    message: str = ""
    exit_code: int | None = None
    epoch: int = 0
    lease_id: str = ""
    enqueue_time: datetime | None = None
    eligible_time: datetime | None = None
    update_time: datetime | None = None
    end_time: datetime | None = None
    lease_expire_time: datetime | None = None
    start_deadline: datetime | None = None
    transitions: list[ItemTransition] = field(default_factory=list)
    relaunched_from: str = ""
    traceparent: str = ""
    secrets: list[SecretMount] = field(default_factory=list)
    """The secrets the launch gave besides the queue's."""
    creator: str = ""
    """Who launched it: ``keys/{key}`` and its display name."""
    position: int = 0
    """For a PENDING item, its place in its queue's dispatch order (1 = next); 0 otherwise."""
    pending_reason: PendingReason | None = None
    """For a PENDING item, why it waits; None otherwise."""
    pending_detail: str = ""
    """For a PENDING item, the reason in words with its numbers (``2 of 2 running``)."""
    _client: Client | None = field(default=None, repr=False, compare=False)

    @property
    def queue(self) -> str:
        """The queue's resource name, ``projects/{p}/queues/{q}``."""
        return self.name.rsplit("/items/", 1)[0]

    @property
    def ended(self) -> bool:
        return self.state.ended

    def refresh(self) -> Item:
        """Fetch the item as it is now."""
        return self._take(self._connected().get_item(self.name))

    def cancel(self, message: str = "") -> Item:
        """Cancel the item: a PENDING one ends CANCELLED at once; a running one once its agent stopped it."""
        return self._take(self._connected().cancel_item(self.name, message=message))

    def wait(self, timeout: float | None = None, on_change: Callable[[Item], None] | None = None) -> Item:
        """Block until the item ends (SUCCEEDED, FAILED or CANCELLED), following its changes as the queue
        pushes them; ``on_change`` is called with this item now and after every change.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first (the item carries on).
        """
        for current in self._connected().watch_item(self.name, timeout=timeout):
            self._take(current)
            if on_change is not None:
                on_change(self)
        return self

    def _connected(self) -> Client:
        if self._client is None:
            raise RuntimeError(f"{self.name} was not fetched through a takeoff.Client; use client.get_item")
        return self._client

    def _take(self, newer: Item) -> Item:
        for item_field in fields(self):
            if item_field.name != "_client":
                setattr(self, item_field.name, getattr(newer, item_field.name))
        return self

    @classmethod
    def _from_proto(cls, message: queue_pb2.Item, client: Client | None = None) -> Self:
        return cls(
            name=message.name,
            state=ItemState._from_proto(message.state),
            job=message.job,
            job_version=message.job_version,
            priority=Priority._from_proto(message.priority),
            run_config=struct_to_dict(message.run_config),
            entrypoint=list(message.entrypoint),
            resource_config_override=struct_to_dict(message.resource_config_override),
            template_variables=struct_to_dict(message.template_variables),
            resource_config=struct_to_dict(message.resource_config),
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            max_run_time=_span(message, "max_run_time"),
            run_display_name=message.run_display_name,
            cancel_requested=message.cancel_requested,
            run=message.run,
            agent=message.agent,
            reason=FailureReason._from_proto(message.reason),
            message=message.message,
            exit_code=message.exit_code if message.HasField("exit_code") else None,
            epoch=message.epoch,
            lease_id=message.lease_id,
            enqueue_time=_time(message, "enqueue_time"),
            eligible_time=_time(message, "eligible_time"),
            update_time=_time(message, "update_time"),
            end_time=_time(message, "end_time"),
            lease_expire_time=_time(message, "lease_expire_time"),
            start_deadline=_time(message, "start_deadline"),
            transitions=[ItemTransition._from_proto(transition) for transition in message.transitions],
            relaunched_from=message.relaunched_from,
            traceparent=message.traceparent,
            secrets=[SecretMount._from_proto(mount) for mount in message.secrets],
            creator=message.creator,
            position=message.position,
            pending_reason=PendingReason._from_proto(message.pending_reason),
            pending_detail=message.pending_detail,
            _client=client,
        )


@dataclass(frozen=True)
class AgentLease:
    """An item an agent holds now."""

    lease_id: str
    item: str
    state: ItemState
    attempt: int = 0
    epoch: int = 0
    run: str = ""
    assign_time: datetime | None = None

    @classmethod
    def _from_proto(cls, message: queue_pb2.AgentLease) -> Self:
        return cls(
            lease_id=message.lease_id,
            item=message.item,
            state=ItemState._from_proto(message.state),
            attempt=message.attempt,
            epoch=message.epoch,
            run=message.run,
            assign_time=_time(message, "assign_time"),
        )


@dataclass(frozen=True)
class Agent:
    """An agent as the queue service sees it: what it serves, how much it takes, what it holds."""

    name: str
    display_name: str = ""
    connected: bool = False
    queues: list[str] = field(default_factory=list)
    resources: list[ResourceKind] = field(default_factory=list)
    capacity: int = 0
    draining: bool = False
    leases: list[AgentLease] = field(default_factory=list)
    version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    session_id: str = ""
    connect_time: datetime | None = None
    last_heartbeat_time: datetime | None = None
    disconnect_time: datetime | None = None

    @property
    def id(self) -> str:
        return self.name.removeprefix("agents/")

    @classmethod
    def _from_proto(cls, message: queue_pb2.Agent) -> Self:
        return cls(
            name=message.name,
            display_name=message.display_name,
            connected=message.connected,
            queues=list(message.queues),
            resources=[ResourceKind._from_proto(kind) for kind in message.resources],
            capacity=message.capacity,
            draining=message.draining,
            leases=[AgentLease._from_proto(lease) for lease in message.leases],
            version=message.version,
            labels=dict(message.labels),
            session_id=message.session_id,
            connect_time=_time(message, "connect_time"),
            last_heartbeat_time=_time(message, "last_heartbeat_time"),
            disconnect_time=_time(message, "disconnect_time"),
        )


@dataclass(frozen=True)
class QueueChange:
    """What :meth:`Client.watch_queue` yields: first the queue as it is (``snapshot``: every open item
    and every agent serving it), then what changed since the change before."""

    snapshot: bool
    """The view to start from: replace what you have (a watch that reconnected starts again with one)."""
    items: list[Item] = field(default_factory=list)
    """Items that changed, as they are now; one that ended comes once, in its final state."""
    agents: list[Agent] = field(default_factory=list)
    """Agents that changed (connected, took or ended a lease, sent a heartbeat)."""
    removed_agents: list[str] = field(default_factory=list)
    """Names of agents that no longer serve the queue."""

    @classmethod
    def _from_proto(cls, message: queue_pb2.WatchQueueResponse, client: Client | None = None) -> Self:
        return cls(
            snapshot=message.snapshot,
            items=[Item._from_proto(item, client) for item in message.items],
            agents=[Agent._from_proto(agent) for agent in message.agents],
            removed_agents=list(message.removed_agents),
        )


@dataclass
class QueueView:
    """A queue's open items and its agents, kept current by :meth:`apply` from :meth:`Client.watch_queue`."""

    items: dict[str, Item] = field(default_factory=dict)
    """Open items by name; an item leaves once it has ended."""
    agents: dict[str, Agent] = field(default_factory=dict)
    """Agents serving the queue, by name."""

    def apply(self, change: QueueChange) -> None:
        if change.snapshot:
            self.items.clear()
            self.agents.clear()
        for item in change.items:
            if item.ended:
                self.items.pop(item.name, None)
            else:
                self.items[item.name] = item
        self.agents.update((agent.name, agent) for agent in change.agents)
        for name in change.removed_agents:
            self.agents.pop(name, None)

    def in_dispatch_order(self) -> list[Item]:
        """PENDING items by their place (the next first), then the others in the order they were
        launched."""
        return sorted(
            self.items.values(),
            key=lambda item: (
                item.position == 0,
                item.position,
                item.enqueue_time or datetime.min.replace(tzinfo=UTC),
                item.name,
            ),
        )


def _time(message: Any, field_name: str) -> datetime | None:
    if not message.HasField(field_name):
        return None
    timestamp: timestamp_pb2.Timestamp = getattr(message, field_name)
    return timestamp.ToDatetime(tzinfo=UTC)


def _span(message: Any, field_name: str) -> timedelta | None:
    if not message.HasField(field_name):
        return None
    duration: duration_pb2.Duration = getattr(message, field_name)
    return duration.ToTimedelta()


__all__ = [
    "Agent",
    "AgentLease",
    "Artifact",
    "ArtifactCollection",
    "ArtifactFile",
    "ArtifactVersion",
    "CodeSource",
    "CreatedJobVersion",
    "Environment",
    "FailureReason",
    "GitSource",
    "ImageSource",
    "Item",
    "ItemState",
    "ItemTransition",
    "Job",
    "JobInputs",
    "JobSource",
    "JobVersion",
    "LogLine",
    "LogStream",
    "MetricRow",
    "Priority",
    "Queue",
    "ResourceKind",
    "RunInfo",
    "RunState",
    "TemplateVariable",
    "dict_to_struct",
    "jsonable",
    "struct_to_dict",
]
