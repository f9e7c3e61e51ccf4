"""What the builder works with: job versions as it sees them, builds, their events, and how builds fail."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from takeoff_server.names import ResourcePattern

BUILD = ResourcePattern("builds/{build}")
JOB = ResourcePattern("projects/{project}/jobs/{job}")
JOB_VERSION = ResourcePattern(
    "projects/{project}/jobs/{job}/versions/{version}", version=r"0|[1-9][0-9]{0,17}"
)

LOG_TAIL_LINES = 50


class BuildKind(enum.StrEnum):
    VENV = "venv"
    IMAGE = "image"
    NOOP = "noop"


class BuildState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (BuildState.SUCCEEDED, BuildState.FAILED)


class FailureReason(enum.StrEnum):
    BUILD_FAILED = "BUILD_FAILED"
    """The job's own inputs are wrong: retrying the same version fails the same way."""
    BUILD_INFRA = "BUILD_INFRA"
    """Something outside the job failed (Docker engine, network, disk): a retry may succeed."""


class BuildError(Exception):
    """Ends a build with a failure event; ``message`` is for people and never carries credentials."""

    reason: FailureReason

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BuildFailed(BuildError):
    reason = FailureReason.BUILD_FAILED


class BuildInfraError(BuildError):
    reason = FailureReason.BUILD_INFRA


@dataclass(frozen=True, slots=True)
class CodeSource:
    sha256: str


@dataclass(frozen=True, slots=True)
class GitSource:
    url: str
    commit: str


@dataclass(frozen=True, slots=True)
class ImageSource:
    reference: str


Source = CodeSource | GitSource | ImageSource


@dataclass(frozen=True, slots=True)
class Environment:
    python_version: str = ""
    requirements: str = ""
    base_image: str = ""
    dockerfile: str = ""
    build_context: str = ""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A resolved job version: what a build needs of it."""

    version_name: str
    source: Source
    entrypoint: tuple[str, ...] = ()
    environment: Environment = Environment()

    @property
    def project(self) -> str:
        return self.version_name.split("/")[1]

    @property
    def job_id(self) -> str:
        return self.version_name.split("/")[3]

    @property
    def job_name(self) -> str:
        return self.version_name.rsplit("/versions/", 1)[0]

    @property
    def source_digest(self) -> str:
        """What the code is cached under: the artifact's sha256 or the git commit."""
        match self.source:
            case CodeSource(sha256=sha256):
                return sha256
            case GitSource(commit=commit):
                return commit
        return ""


@dataclass(frozen=True, slots=True)
class BuildOptions:
    push: bool = False
    no_cache: bool = False


@dataclass(frozen=True, slots=True)
class BuildResult:
    environment_key: str = ""
    build_key: str = ""
    cache_hit: bool = False
    venv_path: str = ""
    code_path: str = ""
    python_path: str = ""
    image: str = ""
    image_id: str = ""
    image_digest: str = ""
    pushed: bool = False


@dataclass(frozen=True, slots=True)
class BuildFailure:
    reason: FailureReason
    message: str
    log_tail: tuple[str, ...] = ()


@dataclass
class Build:
    """One build's record; the log lives beside it."""

    id: str
    job_version: str
    kind: BuildKind
    options: BuildOptions
    create_time: datetime
    state: BuildState = BuildState.QUEUED
    run: str = ""
    environment_key: str = ""
    build_key: str = ""
    cache_hit: bool = False
    cache_detail: str | None = None
    """Set once the cache was looked up (noop builds have no cache)."""
    result: BuildResult | None = None
    failure: BuildFailure | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    log_line_count: int = 0

    @property
    def name(self) -> str:
        return BUILD.format(build=self.id)

    @property
    def job(self) -> str:
        return self.job_version.rsplit("/versions/", 1)[0]


@dataclass(frozen=True, slots=True)
class CacheChecked:
    hit: bool
    environment_key: str
    build_key: str
    detail: str


@dataclass(frozen=True, slots=True)
class LogLine:
    text: str


@dataclass(frozen=True, slots=True)
class Succeeded:
    result: BuildResult


@dataclass(frozen=True, slots=True)
class Failed:
    failure: BuildFailure


EventBody = CacheChecked | LogLine | Succeeded | Failed


@dataclass(frozen=True, slots=True)
class BuildEvent:
    time: datetime
    body: EventBody


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """A Build call, checked: ``job_version`` is a fully qualified job reference."""

    job_version: str
    kind: BuildKind
    options: BuildOptions = BuildOptions()
    run: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class BuildQuery:
    """ListBuilds filters: a job or a version name, states (empty: all), a kind (None: all)."""

    job: str = ""
    states: Sequence[BuildState] = field(default_factory=tuple)
    kind: BuildKind | None = None
