"""The ray runner (docs/design.md §7, §12): each attempt runs as one Ray job, submitted through the Jobs
REST API of the cluster's dashboard (``api.py``).

The job's submission id carries its item and epoch, and its metadata the agent and the lease: a restarted
agent finds its job by id, and the sweep finds this agent's jobs among the cluster's. The cluster shares a
filesystem with the agent (``shared_roots``), so the job runs as a local process does: the builder's venv,
on a copy of the code in the lease directory, its secret files beside it. The job's environment travels
as the runtime environment's ``env_vars``, but for its secret variables (the run token, user secrets):
Ray stores the runtime environment and shows it on its dashboard, so those go into a file of the lease
directory (mode 0600) that the fence reads. The venv's own variables go into the entrypoint instead,
because Ray starts its job supervisor (a Python of Ray's) with the runtime environment too. The entrypoint
runs the job under ``fence.py``, which stops it once the agent's leases lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shlex
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    FailureReason,
    JobExit,
    LogStream,
    ResourceKind,
    RunnerFailure,
    SourceKind,
)
from takeoff_agent.runners.base import (
    JobOutput,
    Launch,
    RunnerContext,
    RunnerRefused,
    refuse_other_options,
    venv_build,
)
from takeoff_agent.runners.local_process import copy_code
from takeoff_agent.runners.ray.api import JsonObject, RayJobsApi
from takeoff_agent.runners.ray.logs import DriverLog, StatusLines
from takeoff_agent.runners.secrets import (
    CA_FILE_VARIABLE,
    LEASE_SECRETS_DIR,
    SECRETS_DIR_VARIABLE,
    check_names,
    write_secret_files,
)
from takeoff_agent.sdk_site import matches_agent_python, write_sdk_site
from takeoff_agent.shim import write_atomically, write_private
from takeoff_server.resource_configs import RAY_OPTIONS

logger = logging.getLogger(__name__)

ENDED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
"""The Ray job states that are final."""
LOG_POLL_SECONDS = 0.5
"""How often a running job's log is read: the API serves the whole log at each read."""
STOP_MARGIN_SECONDS = 15.0
"""How long a stop waits, beyond the job's grace, for Ray to say the job stopped (it sends SIGKILL after
its own ``RAY_JOB_STOP_WAIT_TIME_S``, 3 s by default)."""
AGENT_LABEL = "takeoff.agent"
LEASE_LABEL = "takeoff.lease"
FENCE_SCRIPT = "ray-fence.py"
"""``fence.py``, copied into the agent's state directory, which the cluster sees."""
_FAILED_TO_START = {
    "RUNTIME_ENV_SETUP_FAILURE": FailureReason.BUILD_FAILED,
    "JOB_SUPERVISOR_ACTOR_DIED": FailureReason.PREEMPTED,
}
"""Why Ray failed a job whose entrypoint never ran, as an item's reason (else RUNNER_INFRA)."""


@dataclass(frozen=True, slots=True)
class Options:
    address: str
    """The Ray dashboard, where the Jobs API is: ``http://host:port``."""
    shared_roots: tuple[Path, ...]
    """Directories the agent and every Ray node see at the same paths: the builder's venvs and code, and the
    agent's state directory, must be under them."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """HTTP headers every call carries (``Authorization`` for a proxy in front of the dashboard)."""
    poll_seconds: float = 0.2
    """How often a job's state is read while the agent waits for it to start or end."""


def _options(given: Mapping[str, object]) -> Options:
    known = {"address", "shared_roots", "headers", "poll_seconds"}
    if unknown := sorted(set(given) - known):
        raise ValueError(f"{unknown[0]}: not an option (options: {', '.join(sorted(known))})")
    address = given.get("address")
    if not isinstance(address, str) or not _is_dashboard_url(address):
        raise ValueError("address: must be the Ray dashboard's URL, http://host:port")
    roots = given.get("shared_roots")
    if (
        not isinstance(roots, list)
        or not roots
        or not all(isinstance(r, str) and r.startswith("/") for r in roots)
    ):
        raise ValueError(
            "shared_roots: must list the absolute paths the agent and the Ray nodes share (the builder's "
            "venvs and code and the agent's state directory are under them)"
        )
    headers = given.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        raise ValueError("headers: must map header names to text")
    poll = given.get("poll_seconds", 0.2)
    if not isinstance(poll, int | float) or isinstance(poll, bool) or not 0 < poll <= 60:
        raise ValueError("poll_seconds: must be a number of seconds > 0 and <= 60")
    return Options(address.rstrip("/"), tuple(Path(root) for root in roots), dict(headers), float(poll))


def _is_dashboard_url(address: str) -> bool:
    parts = urlsplit(address)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/")


def create(options: Mapping[str, object], context: RunnerContext) -> RayRunner:
    settings = _options(options)
    if not _under(context.state_dir, settings.shared_roots):
        raise ValueError(
            f"shared_roots: the agent's state directory {context.state_dir} is under none of them (the Ray "
            "nodes run the jobs' code copies and find the SDK there)"
        )
    return RayRunner(RayJobsApi(settings.address, settings.headers), settings, context)


def _under(path: Path, roots: Collection[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def submission_id(assignment: Assignment) -> str:
    """The Ray submission id of an attempt: its item and epoch (one lease of the item), readable on the
    dashboard, with a digest of the item's whole name (ids repeat across queues and projects)."""
    item_id = assignment.item.rsplit("/", 1)[-1]
    digest = hashlib.sha256(assignment.item.encode()).hexdigest()[:10]
    return f"takeoff-{item_id}-e{assignment.epoch}-{digest}"


class RayRunner:
    kind = ResourceKind.RAY
    needs_pushed_image = False

    def __init__(self, api: RayJobsApi, options: Options, context: RunnerContext) -> None:
        self.api = api
        self.options = options
        self.context = context
        self.sdk_site = write_sdk_site(context.state_dir / "sdk")
        self.fence = context.state_dir / FENCE_SCRIPT
        shutil.copyfile(Path(__file__).with_name("fence.py"), self.fence)

    def build_kind(self, source: SourceKind) -> BuildKind:
        return venv_build(self.kind, source)

    def check(self, assignment: Assignment) -> None:
        self.build_kind(assignment.job_version.source)
        refuse_other_options(self.kind, set(assignment.resource_config) - RAY_OPTIONS, RAY_OPTIONS)

    def job(self, assignment: Assignment, lease_dir: Path) -> RayJob:
        return RayJob(self, assignment, lease_dir)

    async def sweep(self, held: Collection[str]) -> None:
        """Stop this agent's Ray jobs that still run for a lease it no longer holds."""
        for details in await self.api.jobs():
            metadata = details.get("metadata") or {}
            if metadata.get(AGENT_LABEL) != self.context.agent_id or details.get("status") in ENDED:
                continue
            if metadata.get(LEASE_LABEL) not in held:  # ``held`` is live: look now, not before listing
                logger.info(
                    "stopping Ray job %s: its lease is no longer this agent's", details["submission_id"]
                )
                await self.api.stop(details["submission_id"])

    async def close(self) -> None:
        await self.api.close()


class RayJob:
    """One attempt's Ray job, found by its submission id."""

    def __init__(self, runner: RayRunner, assignment: Assignment, lease_dir: Path) -> None:
        self._runner = runner
        self._api = runner.api
        self.assignment = assignment
        self.lease_dir = lease_dir.absolute()
        self.submission_id = submission_id(assignment)
        self._record = lease_dir / "ray.json"
        self._secrets_file = lease_dir / "secrets.json"
        self.output = DriverLog()
        self.status = StatusLines()
        self._submitting: asyncio.Future[None] | None = None
        self._stopped = False
        """This agent asked Ray to stop the job: its STOPPED state is the stop, not someone else's."""
        self._exit: JobExit | None = None
        self._logs_read = 0.0

    @property
    def started(self) -> bool:
        """Whether the job may have been submitted: recorded before the submit, so that a job whose submit
        was under way when the agent died is looked for (and found missing, if it never arrived)."""
        return self._record.exists()

    def log_sources(self) -> list[JobOutput]:
        return [JobOutput(LogStream.STDOUT, self.output), JobOutput(LogStream.SYSTEM, self.status)]

    async def start(self, launch: Launch) -> None:
        check_names(launch)
        if launch.registry_address.startswith("unix:"):
            raise RunnerRefused(
                f"Ray jobs cannot reach the registry at {launch.registry_address}: set the agent's "
                "job_registry_address to an address the cluster can reach"
            )
        roots = self._runner.options.shared_roots
        for what, path in (("venv", launch.built.venv_path), ("code", launch.built.code_path)):
            if not _under(Path(path), roots):
                raise RunnerRefused(
                    f"the build's {what} {path} is under none of the ray runner's shared_roots "
                    f"({', '.join(map(str, roots))}): the Ray nodes cannot see it"
                )
        await asyncio.to_thread(self._prepare_files, launch)
        body = {
            "entrypoint": self._entrypoint(launch),
            "submission_id": self.submission_id,
            "runtime_env": {"env_vars": self._environment(launch)},
            "metadata": {
                AGENT_LABEL: self._runner.context.agent_id,
                LEASE_LABEL: self.assignment.lease_id,
                "takeoff.item": self.assignment.item,
                "takeoff.epoch": str(self.assignment.epoch),
                "takeoff.run": self.assignment.run,
            },
            **{key: value for key, value in self.assignment.resource_config.items() if key != "env"},
        }
        write_atomically(self._record, {"submission_id": self.submission_id})
        # Shielded: a start cancelled meanwhile must not leave a job submitted after its stop looked for it.
        self._submitting = asyncio.ensure_future(self._submit(body))
        await asyncio.shield(self._submitting)
        self.status.add(f"submitted Ray job {self.submission_id} to {self._runner.options.address}")
        await self._until_running(launch.report)

    def _prepare_files(self, launch: Launch) -> None:
        """The attempt's copy of the code, its secret files and CA certificate, in the lease directory
        (which the cluster sees)."""
        copy_code(Path(launch.built.code_path), self.lease_dir / "work")
        if launch.secret_files:
            write_secret_files(self.lease_dir / LEASE_SECRETS_DIR, launch.secret_files)
        if launch.ca_file is not None:
            shutil.copyfile(launch.ca_file, self.lease_dir / "ca.pem")
        write_private(self._secrets_file, dict(launch.secrets))

    def _entrypoint(self, launch: Launch) -> str:
        """``cd`` to the code, the venv's variables, then the job's command under the fence. Paths only:
        Ray logs the entrypoint and shows it to anyone who can read the dashboard."""
        venv = Path(launch.built.venv_path)
        python = launch.built.python_path or str(venv / "bin" / "python")
        command = list(self.assignment.entrypoint)
        if command and command[0] in ("python", "python3"):
            command[0] = python
        context_dir = self.assignment.job_version.build_context
        work_dir = self.lease_dir / "work" / context_dir if context_dir else self.lease_dir / "work"
        sdk = f"PYTHONPATH={shlex.quote(str(self._runner.sdk_site))} " if matches_agent_python(venv) else ""
        fence = [
            python,
            str(self._runner.fence),
            str(self.lease_dir / "lease_until"),
            str(launch.stop_grace_seconds),
            str(self.lease_dir / "fenced"),
            str(self._secrets_file),
            "--",
            *command,
        ]
        return (
            f"cd {shlex.quote(str(work_dir))} && "
            f'PATH={shlex.quote(str(venv / "bin"))}:"$PATH" VIRTUAL_ENV={shlex.quote(str(venv))} {sdk}'
            f"exec {shlex.join(fence)}"
        )

    def _environment(self, launch: Launch) -> dict[str, str]:
        """The job's variables (docs/design.md §7) but its secrets (the fence adds those): the launch's,
        where its files are."""
        files = {SECRETS_DIR_VARIABLE: str(self.lease_dir / LEASE_SECRETS_DIR)} if launch.secret_files else {}
        ca = {CA_FILE_VARIABLE: str(self.lease_dir / "ca.pem")} if launch.ca_file is not None else {}
        return {**launch.env, **files, **ca, "TAKEOFF_REGISTRY": launch.registry_address}

    async def _submit(self, body: JsonObject) -> None:
        try:
            await self._api.submit(body)
        except RunnerRefused:
            # Submitted by an earlier try whose answer was lost (Ray refuses an id it has): the same job.
            existing = await self._api.job(self.submission_id)
            if (
                existing is None
                or (existing.get("metadata") or {}).get(LEASE_LABEL) != self.assignment.lease_id
            ):
                raise

    async def until_running(self) -> None:
        await self._until_running(None)

    async def _until_running(self, report: Callable[[str], Awaitable[object]] | None) -> None:
        """Return once Ray runs the job (or it has ended, or is gone); meanwhile ``report`` hears why it
        is pending (resources, its runtime environment being set up)."""
        while (details := await self._api.job(self.submission_id)) is not None:
            if details.get("status") != "PENDING":
                return
            waiting = f"Ray job pending: {details.get('message') or 'waiting to be scheduled'}"
            if report is not None and waiting != self.status.last:
                await report(waiting)
            self.status.add(waiting)
            await asyncio.sleep(self._runner.options.poll_seconds)

    async def wait(self) -> JobExit:
        while True:
            details = await self._api.job(self.submission_id)
            if details is None or details.get("status") in ENDED:
                break
            if time.monotonic() - self._logs_read >= LOG_POLL_SECONDS:
                await self._read_log()
            await asyncio.sleep(self._runner.options.poll_seconds)
        return await self._ended(details)

    async def _read_log(self) -> None:
        self._logs_read = time.monotonic()
        text = await self._api.logs(self.submission_id)
        if text is not None:
            self.output.text = text

    async def _ended(self, details: JsonObject | None) -> JobExit:
        """The job's end, once its state is final: its whole log read first."""
        await self._read_log()
        ended = self._exit_of(details)
        if ended.failure is not None:
            self.status.add(ended.failure.message)
        self._exit = ended
        return ended

    def _exit_of(self, details: JsonObject | None) -> JobExit:
        if details is None:
            failure = (
                f"the Ray job {self.submission_id} is not on the cluster (deleted, or the cluster restarted)"
            )
            return JobExit(None, failure=RunnerFailure(FailureReason.RUNNER_INFRA, failure))
        fenced = (self.lease_dir / "fenced").exists()
        status, code = details.get("status"), details.get("driver_exit_code")
        if status == "SUCCEEDED":
            return JobExit(0)
        if status == "STOPPED":
            if self._stopped or fenced:
                return JobExit(128 + signal.SIGTERM, signal.SIGTERM, fenced=fenced)
            failure = f"the Ray job {self.submission_id} was stopped on the cluster, not by Takeoff"
            return JobExit(None, failure=RunnerFailure(FailureReason.PREEMPTED, failure))
        if isinstance(code, int):
            signalled = code - 128 if 128 < code <= 128 + 64 else None
            return JobExit(code, signalled, fenced=fenced)
        error_type = str(details.get("error_type") or "")
        message = _tail(str(details.get("message") or "no message"))
        failure = (
            f"the Ray job {self.submission_id} failed before its entrypoint ran ({error_type}): {message}"
        )
        return JobExit(
            None, failure=RunnerFailure(_FAILED_TO_START.get(error_type, FailureReason.RUNNER_INFRA), failure)
        )

    def exit(self) -> JobExit | None:
        return self._exit

    async def stop(self, grace: float) -> None:
        """Ray's stop (SIGTERM, SIGKILL after the cluster's ``RAY_JOB_STOP_WAIT_TIME_S``), and wait for the
        job to end. A job still pending is not waited for: Ray keeps it pending until the cluster schedules
        it, then stops it at once; by then its lease directory is gone, so its command never runs."""
        if self._submitting is not None:
            with contextlib.suppress(Exception):
                await self._submitting  # a job still being submitted is stopped once it is
        if not self.started or self._exit is not None:
            return
        self._stopped = True
        await self._api.stop(self.submission_id)
        deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        while (details := await self._api.job(self.submission_id)) is not None:
            status = details.get("status")
            if status in ENDED:
                break
            if status == "PENDING" or time.monotonic() > deadline:
                self.status.add(f"Ray job {self.submission_id} is still {status} after its stop")
                return
            await asyncio.sleep(self._runner.options.poll_seconds)
        await self._ended(details)

    async def renew_lease(self, until: float) -> None:
        """Tell the job's fence the agent's leases are good until ``until`` (UNIX seconds)."""
        with contextlib.suppress(FileNotFoundError):  # a lease forgotten meanwhile has no fence to tell
            write_atomically(self.lease_dir / "lease_until", until)


def _tail(message: str, lines: int = 10) -> str:
    """The end of Ray's message (a runtime environment's failure quotes pip's whole output)."""
    return "\n".join(message.strip().splitlines()[-lines:])[-2000:]
