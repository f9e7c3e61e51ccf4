"""Plain Python records of what the registry stores, converted to and from the v1 protos.

The client returns these instead of generated messages: their fields have Python types (``datetime``,
``dict``, enums), unset timestamps are ``None``, and free-form JSON is a ``dict``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from google.protobuf import struct_pb2, timestamp_pb2

from takeoff.v1 import common_pb2, jobs_pb2, runs_pb2


class RunState(enum.StrEnum):
    """State of a run; FINISHED, FAILED, CRASHED and KILLED are final."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    KILLED = "KILLED"

    @property
    def ended(self) -> bool:
        return self not in (RunState.STARTING, RunState.RUNNING)

    @classmethod
    def _from_proto(cls, value: common_pb2.RunState.ValueType) -> RunState:
        return cls(common_pb2.RunState.Name(value).removeprefix("RUN_STATE_"))

    def _to_proto(self) -> common_pb2.RunState.ValueType:
        return common_pb2.RunState.Value(f"RUN_STATE_{self.value}")


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


@dataclass(frozen=True)
class Job:
    """A named task in a project; its content lives in its versions."""

    name: str
    description: str = ""
    version_count: int = 0
    latest_version: str = ""
    aliases: dict[str, int] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def project(self) -> str:
        return self.name.split("/")[1]

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
class RunInfo:
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

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def project(self) -> str:
        return self.name.split("/")[1]

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

    @classmethod
    def _from_proto(cls, message: runs_pb2.LogLine) -> Self:
        return cls(message.index, message.text, LogStream._from_proto(message.stream), _time(message, "time"))


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python; whole numbers come back as ``int`` (a Struct holds only doubles)."""
    return {key: _from_value(value) for key, value in struct.fields.items()}


def dict_to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(jsonable(values))
    return struct


def jsonable(value: Any) -> Any:
    """``value`` made of what JSON holds; numpy and torch values become numbers and lists, others text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    return str(value)


def _from_value(value: struct_pb2.Value) -> Any:
    match value.WhichOneof("kind"):
        case "number_value":
            number = value.number_value
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        case "struct_value":
            return struct_to_dict(value.struct_value)
        case "list_value":
            return [_from_value(item) for item in value.list_value.values]
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
    return None


def _time(message: Any, field_name: str) -> datetime | None:
    if not message.HasField(field_name):
        return None
    timestamp: timestamp_pb2.Timestamp = getattr(message, field_name)
    return timestamp.ToDatetime(tzinfo=UTC)


__all__ = [
    "Artifact",
    "CodeSource",
    "CreatedJobVersion",
    "Environment",
    "GitSource",
    "ImageSource",
    "Job",
    "JobInputs",
    "JobSource",
    "JobVersion",
    "LogLine",
    "LogStream",
    "MetricRow",
    "RunInfo",
    "RunState",
    "dict_to_struct",
    "jsonable",
    "struct_to_dict",
]
