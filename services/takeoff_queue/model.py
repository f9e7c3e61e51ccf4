"""The queue service's domain objects: queues, items, agents and the messages an agent is sent.

Plain Python: the API layer turns these into protos and back.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from takeoff_queue.lifecycle import FailureReason, ItemLife, ItemState, RetryPolicy, Transition
from takeoff_queue.resource_config import ResourceKind
from takeoff_server.names import ResourcePattern

PROJECT = ResourcePattern("projects/{project}")
QUEUE = ResourcePattern("projects/{project}/queues/{queue}")
ITEM = ResourcePattern("projects/{project}/queues/{queue}/items/{item}")
ITEM_IN_ANY_QUEUE = ResourcePattern("projects/{project}/queues/-/items/{item}")
"""GetItem's name for an item of whichever queue of the project holds it (item ids are unique)."""
AGENT = ResourcePattern("agents/{agent}", agent=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_START_TIMEOUT = timedelta(minutes=30)


def default_start_timeout(resource: ResourceKind) -> timedelta:
    """30 minutes, but unlimited (0) on Slurm: a job waiting its turn on a busy cluster must not spend
    attempts, nor lose its place in Slurm's queue to a resubmission."""
    return timedelta(0) if resource is ResourceKind.SLURM else DEFAULT_START_TIMEOUT


class Priority(enum.IntEnum):
    """Lower values are served first."""

    CRITICAL = 1
    HIGH = 2
    MEDIUM = 3
    LOW = 4


class SourceKind(enum.Enum):
    CODE = "code"
    GIT = "git"
    IMAGE = "image"


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True, slots=True)
class SecretMount:
    """A secret given to a job (docs/design.md §13): its value as the environment variable ``env`` or as
    the file ``file`` under the job's secrets directory (exactly one of them)."""

    secret: str
    """``projects/{p}/secrets/{s}``: a short id is resolved in the queue's project when it is stored."""
    env: str = ""
    file: str = ""

    @property
    def target(self) -> tuple[str, str]:
        """Where the value goes: a later mount to the same place replaces an earlier one."""
        return ("env", self.env) if self.env else ("file", self.file)

    def as_json(self) -> dict[str, str]:
        return {"secret": self.secret, "env": self.env, "file": self.file}

    @classmethod
    def from_json(cls, value: dict[str, str]) -> SecretMount:
        return cls(value["secret"], value.get("env", ""), value.get("file", ""))


def merged_mounts(queue: Sequence[SecretMount], item: Sequence[SecretMount]) -> tuple[SecretMount, ...]:
    """What an attempt is given: the queue's mounts, then the item's; an item's mount replaces a queue's
    mount of the same environment variable or file."""
    replaced = {mount.target for mount in item}
    return (*(mount for mount in queue if mount.target not in replaced), *item)


@dataclass
class Queue:
    name: str
    resource: ResourceKind
    create_time: datetime
    update_time: datetime
    description: str = ""
    resource_config: dict[str, Any] = field(default_factory=dict)
    template_variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> {"schema": JSON Schema, "description": text}"""
    prioritization: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_job_failures: bool = False
    retry_delay: timedelta = timedelta(0)
    start_timeout: timedelta | None = None
    """How long an assignment may take to reach RUNNING; 0: unlimited; None (unset in a create or update):
    the resource kind's default, which the book fills in (:func:`default_start_timeout`)."""
    max_run_time: timedelta | None = None
    concurrency_limit: int = 0
    paused: bool = False
    container_name: str = ""
    secure: bool = False
    """Items may not override the entrypoint or dangerous resource options (docs/design.md §13)."""
    allow_host_paths: bool = False
    """The queue's own resource config may mount host paths."""
    secrets: tuple[SecretMount, ...] = ()
    """Secrets every item of the queue receives."""

    @property
    def project(self) -> str:
        return self.name.rsplit("/queues/", 1)[0]

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retry_job_failures=self.retry_job_failures, retry_delay=self.retry_delay)

    @property
    def variable_schemas(self) -> dict[str, dict[str, Any]]:
        return {name: variable["schema"] for name, variable in self.template_variables.items()}


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """A job reference pinned to one version, as the registry described it."""

    version_name: str
    source_kind: SourceKind
    entrypoint: list[str]
    input_schema: dict[str, Any] | None
    default_config: dict[str, Any]
    version_proto: bytes
    """The serialized JobVersion, handed to agents in Assignments as the registry gave it."""


@dataclass
class Item:
    """An item as the dispatcher holds it: what was enqueued, and its life (state, lease and history).

    ``life`` is the one owner of everything that changes; the properties below only read it.
    """

    id: str
    queue: str
    job: str
    job_version: str
    job_version_proto: bytes
    source_kind: SourceKind
    run_config: dict[str, Any]
    entrypoint: list[str]
    resource_config_override: dict[str, Any]
    template_variables: dict[str, Any]
    resource_config: dict[str, Any]
    priority: Priority
    life: ItemLife
    max_run_time: timedelta | None = None
    run_display_name: str = ""
    traceparent: str = ""
    relaunched_from: str = ""
    secrets: tuple[SecretMount, ...] = ()
    """Secrets the item's job receives besides its queue's (EnqueueRequest.secrets)."""
    creator: str = ""
    """Who enqueued (or relaunched) the item: ``keys/{key} (display name)``."""
    seq: int = 0
    update_time: datetime | None = None
    committed: ItemLife | None = None
    """The life as the store holds it (None until the item's first commit)."""
    revision: int = 0
    """How many times the store's row was written after its insert: every write is conditional on it, so
    a replica writing from a stale copy changes nothing (docs/design.md §5 "Several queue replicas")."""

    @property
    def name(self) -> str:
        return f"{self.queue}/items/{self.id}"

    @property
    def state(self) -> ItemState:
        return self.life.state

    @property
    def history(self) -> tuple[Transition, ...]:
        return self.life.history

    @property
    def lease_id(self) -> str:
        return self.life.lease_id

    @property
    def assign_time(self) -> datetime | None:
        return self.life.assign_time

    @property
    def start_deadline(self) -> datetime | None:
        return self.life.start_deadline

    @property
    def running_since(self) -> datetime | None:
        return self.life.running_since

    @property
    def end_time(self) -> datetime | None:
        return self.life.end_time

    @property
    def project(self) -> str:
        return self.queue.rsplit("/queues/", 1)[0]

    def run_name(self, attempt: int) -> str:
        return f"{self.project}/runs/{self.id}-{attempt}"


@dataclass
class Agent:
    """An agent the service knows: connected now, or away but still holding leases."""

    agent_id: str
    display_name: str = ""
    queues: list[str] = field(default_factory=list)
    resources: set[ResourceKind] = field(default_factory=set)
    capacity: int = 0
    draining: bool = False
    version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    session_id: str = ""
    key: str = ""
    """The key its session connected with (``keys/{key}``); "" without access control."""
    connected: bool = False
    leases: dict[str, str] = field(default_factory=dict)
    """lease id -> item id"""
    leases_committing: int = 0
    """New items leased to it at Enqueue whose insert is being committed: room held, not yet in ``leases``."""
    lease_expiry: datetime | None = None
    connect_time: datetime | None = None
    last_heartbeat_time: datetime | None = None
    disconnect_time: datetime | None = None
    next_queue: int = 0
    """Where the round-robin over ``queues`` resumes."""

    @property
    def name(self) -> str:
        return f"agents/{self.agent_id}"

    @property
    def free_capacity(self) -> int:
        if self.draining or not self.connected:
            return 0
        return max(0, self.capacity - len(self.leases) - self.leases_committing)


@dataclass(frozen=True, slots=True)
class Hello:
    agent_id: str
    session_id: str
    display_name: str
    queues: list[str]
    resources: set[ResourceKind]
    capacity: int
    held_leases: dict[str, int]
    """lease id -> epoch"""
    version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    draining: bool = False


class MessageKind(enum.Enum):
    HEARTBEAT = "HEARTBEAT"
    PROGRESS = "PROGRESS"
    COMPLETE = "COMPLETE"
    RELEASE = "RELEASE"
    SET_CAPACITY = "SET_CAPACITY"
    DRAIN = "DRAIN"


class RejectReason(enum.Enum):
    LEASE_LOST = "LEASE_LOST"
    LEASE_NOT_FOUND = "LEASE_NOT_FOUND"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    NOT_COMMITTED = "NOT_COMMITTED"


class RevokeReason(enum.Enum):
    EXPIRED = "EXPIRED"
    LEASE_LOST = "LEASE_LOST"
    START_TIMEOUT = "START_TIMEOUT"
    MAX_RUN_TIME_EXCEEDED = "MAX_RUN_TIME_EXCEEDED"
    QUEUE_DELETED = "QUEUE_DELETED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class LeaseVerdict:
    lease_id: str
    item: str
    kept: bool
    reason: RevokeReason | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Welcome:
    agent: str
    session_id: str
    lease_ttl: timedelta
    heartbeat_interval: timedelta
    verdicts: list[LeaseVerdict]
    server_time: datetime


@dataclass(frozen=True, slots=True)
class Assignment:
    item: Item
    queue: Queue
    lease_id: str
    epoch: int
    attempt: int
    run: str
    assign_time: datetime
    start_deadline: datetime | None
    """None: the queue's start timeout is unlimited (slurm queues by default)."""
    run_token: str = field(default="", repr=False)
    """The attempt's run token (signed by the queue, docs/design.md §13); never stored or logged."""
    secrets: tuple[SecretMount, ...] = ()
    """The queue's mounts, then the item's (:func:`merged_mounts`)."""


@dataclass(frozen=True, slots=True)
class Ack:
    sequence: int
    of: MessageKind
    lease_id: str = ""
    state: ItemState | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    sequence: int
    of: MessageKind | None
    """None: the refused message was of no kind (no field set)."""
    lease_id: str
    reason: RejectReason
    message: str


@dataclass(frozen=True, slots=True)
class Cancel:
    lease_id: str
    item: str
    message: str


@dataclass(frozen=True, slots=True)
class Revoke:
    lease_id: str
    item: str
    reason: RevokeReason
    message: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The stream must end: a newer session of the same agent took over, or the server is stopping."""

    superseded: bool


AgentMessage = Welcome | Assignment | Ack | Reject | Cancel | Revoke | SessionClosed


@dataclass(frozen=True, slots=True)
class Progress:
    sequence: int
    lease_id: str
    epoch: int
    state: ItemState
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Complete:
    sequence: int
    lease_id: str
    epoch: int
    outcome: ItemState
    reason: FailureReason | None
    exit_code: int | None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Release:
    sequence: int
    lease_id: str
    epoch: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sequence: int


@dataclass(frozen=True, slots=True)
class SetCapacity:
    sequence: int
    capacity: int


@dataclass(frozen=True, slots=True)
class Drain:
    sequence: int


AgentRequest = Progress | Complete | Release | Heartbeat | SetCapacity | Drain
