"""The one protocol every runner implements (docs/design.md §7, §12).

A runner knows one resource kind: which build its jobs need, how to start a job, follow its output, wait
for its end, stop it (SIGTERM, grace, SIGKILL or the platform's equivalent), keep its self-fencing deadline
ahead of the lease, and find its own work again after an agent restart. The attempt (``work.py``) drives
the same steps whatever the kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from takeoff_agent.domain import Assignment, BuildKind, Built, JobExit, LogStream, ResourceKind, SourceKind


class RunnerRefused(Exception):
    """The runner cannot run this assignment as configured (an option it does not take, by name): the
    attempt fails CONFIG_INVALID, never retried as infrastructure."""


def venv_build(kind: ResourceKind, source: SourceKind) -> BuildKind:
    """The build of a runner whose jobs run from a venv (local-process, slurm, ray): an image job is
    refused (the queue refuses it at enqueue already: SOURCE_INCOMPATIBLE)."""
    if source is SourceKind.IMAGE:
        raise RunnerRefused(f"an image job cannot run on {kind.config_name}: it runs code and git jobs")
    return BuildKind.VENV


def refuse_other_options(kind: ResourceKind, refused: Collection[str], allowed: Collection[str]) -> None:
    """RunnerRefused naming every option in ``refused`` (sorted), and the options ``kind`` takes."""
    if refused:
        raise RunnerRefused(
            f"{kind.config_name} does not take the resource option {', '.join(sorted(refused))}"
            f" (it takes: {', '.join(sorted(allowed))})"
        )


class RunnerUnavailable(Exception):
    """What the runner needs is unreachable (Docker engine, Kubernetes API): the attempt fails
    RUNNER_INFRA, retryable."""


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything a runner needs to start one attempt's job."""

    assignment: Assignment
    built: Built
    env: Mapping[str, str]
    """The job's environment: the resource config's ``env``, then ``PYTHONUNBUFFERED=1``, ``TAKEOFF_*``
    (but TAKEOFF_REGISTRY, which the runner sets from ``registry_address``) and TRACEPARENT over it. Never
    the agent's environment."""
    secrets: Mapping[str, str]
    """Secret environment variables (TAKEOFF_TOKEN, user secrets), kept apart so that no runner logs or
    stores them in plain sight: a Kubernetes Secret, a container's env, the shim's spec file (mode 0600)."""
    registry_address: str
    """How jobs reach the registry: the agent's ``job_registry_address``, else its ``registry_address``
    (``host:port`` or ``unix:/path``; a container runner mounts a Unix socket into the container)."""
    stop_grace_seconds: float
    report: Callable[[str], Awaitable[object]] | None = None
    """Tells the queue a new STARTING detail while ``start`` waits (for free GPUs, a pod to schedule)."""
    secret_files: Mapping[str, bytes] = field(default_factory=dict)
    """Secret files (file name -> content): the job finds each in the directory ``TAKEOFF_SECRETS_DIR``
    names (mode 0700, files 0600; a Kubernetes Secret volume, a read-only bind mount in a container). A
    name is one path component (no ``/``, not ``.`` or ``..``); the runner refuses others."""
    ca_file: Path | None = None
    """The CA certificate a job needs when the registry it is given uses TLS: the job finds it where
    ``TAKEOFF_TLS_CA_FILE`` says (the file itself on local-process, a read-only copy in containers and
    pods)."""


@dataclass(frozen=True, slots=True)
class RunnerContext:
    """What every runner is told about the agent it serves."""

    agent_id: str
    """The value of the ``takeoff.agent`` label on everything the runner starts."""
    state_dir: Path
    """The agent's state directory (lease directories live in ``leases/`` below it)."""
    relay: str | None = None
    """The agent's run relay as a job on this host reaches it (``TAKEOFF_RELAY``: ``@takeoff-relay-{id}``,
    an abstract Unix socket, docs/design.md §8); None when it does not run. Only the local-process runner
    gives it to jobs: containers, pods and jobs on other nodes cannot reach the host's abstract sockets."""


class LogSource(Protocol):
    """Complete lines of one output stream of a job, from ``offset`` on.

    ``offset`` is opaque to the attempt (bytes of a file, lines of a pod log): it records it with the lines
    it has sent and sets it back after an agent restart, so every line reaches the run exactly once.
    """

    offset: int

    def read_lines(self, *, final: bool = False) -> list[str]:
        """New complete lines; with ``final`` (the job has ended), also a last line without its newline."""
        ...


@dataclass(frozen=True, slots=True)
class JobOutput:
    """One output stream of a job, and which rank of a multi-node launch writes it (None: a job of one
    process). The rank labels the stream's lines in the run's log."""

    stream: LogStream
    source: LogSource
    rank: int | None = None


class Job(Protocol):
    """One attempt's job, found through its lease directory (so a restarted agent can take it back)."""

    @property
    def started(self) -> bool:
        """Whether ``start`` was called for this attempt, by this agent or one before a restart."""
        ...

    def log_sources(self) -> list[JobOutput]:
        """The job's output streams, the same list (in number and order) for an attempt whichever agent
        asks, before or after ``start``: a restarted agent sets each one's recorded offset back."""
        ...

    async def start(self, launch: Launch) -> None:
        """Start the job and return once it runs (or has ended); raises RunnerRefused or RunnerUnavailable
        when it cannot. It may wait long (GPUs, an image pull, a pending pod): the attempt cancels it when
        the job must stop first, so it must be safe to cancel at any await."""
        ...

    async def until_running(self) -> None:
        """Return once a job started before an agent restart runs (or has ended): its pod may still be
        pending. Cancelled like ``start``."""
        ...

    async def wait(self) -> JobExit:
        """The job's end, whether it ends by itself, is stopped, or ended while the agent was away."""
        ...

    def exit(self) -> JobExit | None:
        """How the job ended, if it has (without waiting)."""
        ...

    async def stop(self, grace: float) -> None:
        """Ask the job to end, kill it after ``grace`` seconds, and remove what ran it (container, Job)."""
        ...

    async def renew_lease(self, until: float) -> None:
        """The agent's leases hold until ``until`` (UNIX seconds): a job whose agent stops renewing is
        stopped by something that outlives the agent (the shim, the Job's activeDeadlineSeconds)."""
        ...


class Runner(Protocol):
    kind: ResourceKind
    needs_pushed_image: bool
    """Whether an image the builder makes for it must be pushed to the builder's registry (its work runs
    on other machines: kubernetes), else kept in the local engine."""

    def build_kind(self, source: SourceKind) -> BuildKind:
        """What the builder must make for a job of ``source`` to run here."""
        ...

    def check(self, assignment: Assignment) -> None:
        """Raise RunnerRefused naming each resource option this runner does not take."""
        ...

    def job(self, assignment: Assignment, lease_dir: Path) -> Job:
        """The job of ``assignment``, new or left by an earlier run of the agent."""
        ...

    async def sweep(self, held: Collection[str]) -> None:
        """Remove this agent's labelled work whose lease id is not in ``held`` (called once the queue has
        said which leases it keeps): no orphans after a restart. ``held`` is a live view of the agent's
        leases, which new assignments join while the sweep runs: test membership when removing, not
        before listing."""
        ...

    async def close(self) -> None: ...


# Each runner module (``runners/local_process.py``, ``container.py``, the ``kubernetes`` package) exposes
#     def create(options: Mapping[str, object], context: RunnerContext) -> Runner
# which validates its section of the agent config's ``runners:`` and raises ValueError with a message
# naming the bad option, so the agent refuses to start with it.
