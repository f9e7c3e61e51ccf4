"""The agent's domain: what it is assigned, what it builds, how a job ended and what it reports.

Plain Python, converted from and to protos only at the edges (``wire.py``: the Lease stream and the
builder's answers). Enums carry the proto numbers, so conversion is ``Enum(number)`` and ``int(member)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from takeoff_server.names import ResourcePattern

RUN = ResourcePattern("projects/{project}/runs/{run}")
ITEM = ResourcePattern("projects/{project}/queues/{queue}/items/{item}")
JOB_VERSION = ResourcePattern("projects/{project}/jobs/{job}/versions/{version}", version=r"[0-9]{1,18}")


class ResourceKind(enum.IntEnum):
    """Where a queue's work runs; the values are ``takeoff.v1.ResourceKind``'s."""

    LOCAL_PROCESS = 1
    LOCAL_CONTAINER = 2
    KUBERNETES = 3
    SLURM = 4
    RAY = 5

    @property
    def config_name(self) -> str:
        """The spelling in agent configs and messages: ``local-container``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_config_name(cls, name: str) -> ResourceKind:
        return cls[name.upper().replace("-", "_")]


class SourceKind(enum.Enum):
    CODE = "code"
    GIT = "git"
    IMAGE = "image"


class BuildKind(enum.IntEnum):
    """``takeoff.v1.BuildKind``."""

    VENV = 1
    IMAGE = 2
    NOOP = 3


class ItemState(enum.IntEnum):
    """``takeoff.v1.ItemState``: the states an agent reports."""

    LEASED = 2
    BUILDING = 3
    STARTING = 4
    RUNNING = 5
    SUCCEEDED = 6
    FAILED = 7
    CANCELLED = 8


class RunState(enum.IntEnum):
    """``takeoff.v1.RunState``."""

    STARTING = 1
    RUNNING = 2
    FINISHED = 3
    FAILED = 4
    CRASHED = 5
    KILLED = 6


class FailureReason(enum.IntEnum):
    """``takeoff.v1.FailureReason`` (its comments say which are retryable)."""

    UNSPECIFIED = 0
    AGENT_LOST = 1
    BUILD_INFRA = 2
    PREEMPTED = 3
    START_TIMEOUT = 4
    RUNNER_INFRA = 5
    RELEASED = 6
    MAX_RUN_TIME_EXCEEDED = 7
    JOB_FAILED = 8
    NO_RUN = 9
    BUILD_FAILED = 10
    CONFIG_INVALID = 11
    CANCELLED = 12


class LogStream(enum.IntEnum):
    """``takeoff.v1.LogStream``."""

    STDOUT = 1
    STDERR = 2
    SYSTEM = 3
    BUILD = 4


@dataclass(frozen=True, slots=True)
class JobVersion:
    """The pinned job version an assignment runs."""

    name: str
    """``projects/{p}/jobs/{j}/versions/{n}``."""
    source: SourceKind
    image: str = ""
    """Image jobs: the image reference to run."""
    build_context: str = ""
    """Code and git jobs: the job's working directory, relative to the code's root."""

    @property
    def label(self) -> str:
        """``job:vN``, as TAKEOFF_JOB gives it to the job."""
        parts = JOB_VERSION.parse(self.name, field="job_version.name")
        return f"{parts['job']}:v{parts['version']}"


@dataclass(frozen=True, slots=True)
class SecretMount:
    """A project secret the job receives: as the environment variable ``env`` or as the file ``file`` of
    its secrets directory (exactly one is set)."""

    secret: str
    """``projects/{p}/secrets/{s}``."""
    env: str = ""
    file: str = ""

    @property
    def target(self) -> str:
        """Where the job finds it, for messages: ``env FOO`` or ``file foo.json``."""
        return f"env {self.env}" if self.env else f"file {self.file}"


@dataclass(frozen=True, slots=True)
class Assignment:
    """One lease of one item, as the queue service assigned it."""

    lease_id: str
    epoch: int
    item: str
    """``projects/{p}/queues/{q}/items/{i}``."""
    queue: str
    run: str
    """``projects/{p}/runs/{run}``: the run to create for this attempt."""
    attempt: int
    job_version: JobVersion
    resource: ResourceKind
    entrypoint: tuple[str, ...]
    run_config: dict[str, Any] = field(default_factory=dict)
    resource_config: dict[str, Any] = field(default_factory=dict)
    """The queue's resource config merged with the item's override, template variables filled."""
    container_name: str = ""
    """kubernetes: the container that runs the job; empty: the first."""
    run_display_name: str = ""
    assign_time: float = 0.0
    """UNIX seconds."""
    start_deadline: float | None = None
    """UNIX seconds by which the job must be RUNNING."""
    max_run_time: float | None = None
    """Seconds of RUNNING allowed; None: unlimited."""
    traceparent: str = ""
    run_token: str = field(default="", repr=False)
    """The attempt's run token: it writes the run (and reads the secrets below) and the job gets it as
    TAKEOFF_TOKEN. Empty from a queue that mints none: the agent's own key writes the run then."""
    secrets: tuple[SecretMount, ...] = ()

    @property
    def project(self) -> str:
        return RUN.parse(self.run, field="run")["project"]

    @property
    def run_id(self) -> str:
        return RUN.parse(self.run, field="run")["run"]


@dataclass(frozen=True, slots=True)
class Built:
    """What the builder made for an attempt (the fields of its kind are set)."""

    kind: BuildKind
    venv_path: str = ""
    code_path: str = ""
    python_path: str = ""
    image: str = ""
    """image: ``{repository}/{job}:{build key[:16]}``; noop: the job's image reference."""
    image_id: str = ""
    pushed: bool = False
    cache_hit: bool = False


@dataclass(frozen=True, slots=True)
class RunnerFailure:
    """The runner, not the job's code, decided how the attempt ends (an image that will not pull, an
    evicted pod, a resource option it refuses)."""

    reason: FailureReason
    message: str


@dataclass(frozen=True, slots=True)
class JobExit:
    """How a job ended."""

    exit_code: int | None
    """None when the job never ran (``failure`` says why)."""
    signal: int | None = None
    fenced: bool = False
    """Stopped by the host-side fence because the agent's leases ran out."""
    oom_killed: bool = False
    failure: RunnerFailure | None = None
    rank: int | None = None
    """In a multi-node launch, the rank whose end ended the job (the first to fail); None: a job of one
    process, or every rank exited 0."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What Complete reports."""

    state: ItemState
    reason: FailureReason = FailureReason.UNSPECIFIED
    exit_code: int | None = None
    message: str = ""
