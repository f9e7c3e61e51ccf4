"""The slurm runner (docs/design.md §7, §12): each attempt is one Slurm batch job, submitted with
``sbatch --parsable`` from the login node the agent runs on.

The batch step runs the shim (``slurm_batch.py``), which runs the job as it does a local process: output
to files in the lease directory, ``exit.json`` at the end, self-fencing at ``lease_until``. The lease
directory, the builder's venv and code, the SDK site and the interpreter that runs the shim must be on a
filesystem the compute nodes see: under one of the runner's ``shared_roots``. Nothing depends on Slurm's
accounting (often off): state comes from ``squeue --json`` while Slurm keeps the job (``MinJobAge``), the
end from the shim's exit file, and from Slurm's own end state when that is its doing (a time limit, a
preemption, a failed node).

The job's name, ``takeoff.{item}.{epoch}.{agent}.{lease}``, says what it runs to anyone reading
``squeue`` and lets a restarted agent find a job whose id it never recorded (submitted just before a
crash); the sweep cancels this agent's jobs of leases it does not hold. A multi-node launch (``nodes`` times
``ntasks_per_node`` > 1) runs ``srun --kill-on-bad-exit`` under the shim, one rank per task, each rank's
output in files of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
from takeoff_agent.log_tail import LogTail, shim_output
from takeoff_agent.ranks import World, world_of
from takeoff_agent.runners.base import (
    JobOutput,
    Launch,
    RunnerContext,
    RunnerRefused,
    RunnerUnavailable,
    refuse_other_options,
    venv_build,
)
from takeoff_agent.runners.local_process import LocalProcessJob, agent_environment, copy_code
from takeoff_agent.runners.secrets import check_names, write_secret_files
from takeoff_agent.runners.slurm_batch import MULTI_NODE_KEY
from takeoff_agent.sdk_site import write_sdk_site
from takeoff_agent.shim import output_files, write_atomically, write_private
from takeoff_server.resource_configs import SBATCH_EXTRA_OPTIONS, SLURM_OPTIONS

logger = logging.getLogger(__name__)

BATCH_ENTRY = Path(__file__).with_name("slurm_batch.py")
SLURM_LOG = "slurm.log"
"""The batch step's own output (``sbatch --output``): Slurm's messages about the job (``*** JOB 12 ON
node CANCELLED DUE TO TIME LIMIT ***``) and anything the batch script says before the shim runs."""
JOB_RECORD = "slurm.json"
"""Written once sbatch has answered: the Slurm job's id."""
EXIT_RECORD_SECONDS = 10.0
"""How long a stop waits, beyond the job's grace, for the shim to record the end of the job it stopped
before it has Slurm cancel the job."""
SETTLE_SECONDS = 10.0
"""How long the shim's exit file and Slurm's end of the job may be seen apart before the runner concludes
from the half it has (the batch step ends just after the shim writes the file)."""
NAME_PREFIX = "takeoff."
SLURM_CONF = "SLURM_CONF"
"""Where Slurm's commands find the cluster's configuration, when not in its default place."""
WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
"""Slurm job states of a job that has not started (yet)."""
ENDED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "PREEMPTED",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)
INFRASTRUCTURE_ENDS = {
    "PREEMPTED": (FailureReason.PREEMPTED, "Slurm preempted the job (PREEMPTED)"),
    "NODE_FAIL": (FailureReason.PREEMPTED, "a node of the job failed (NODE_FAIL)"),
    "BOOT_FAIL": (FailureReason.RUNNER_INFRA, "a node of the job failed to boot (BOOT_FAIL)"),
}
"""Ends that are not the job's doing: retried like any infrastructure failure."""
LIMIT_ENDS = {
    "TIMEOUT": "TIMEOUT: Slurm stopped the job at its time limit",
    "DEADLINE": "DEADLINE: Slurm stopped the job at its deadline",
}
"""Ends at a limit the job was submitted with: its own failure, not retried."""
OPTION_FLAGS = {
    "partition": "--partition",
    "nodes": "--nodes",
    "ntasks_per_node": "--ntasks-per-node",
    "gpus_per_node": "--gpus-per-node",
    "cpus_per_task": "--cpus-per-task",
    "mem": "--mem",
    "time": "--time",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
}
"""Resource options that are sbatch options of the same name (``env`` and ``sbatch`` are not)."""
OPTION_NAMES = (
    "shared_roots",
    "partition",
    "poll_seconds",
    "sbatch",
    "squeue",
    "scancel",
    "srun",
    "python",
    "pass_env",
)


def create(options: Mapping[str, object], context: RunnerContext) -> SlurmRunner:
    """The runner. ``shared_roots`` (required): the directories the compute nodes see as this host does;
    the agent's state directory, the builder's venvs and code, and ``python`` (the interpreter that runs
    the shim in the batch job, default the agent's) must be under one. ``partition``: the default when a
    resource config names none; ``poll_seconds``: how often ``squeue`` is asked (default 1);
    ``sbatch``, ``squeue``, ``scancel``, ``srun``: the commands (default: found on ``PATH``);
    ``pass_env`` as for local-process."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)} (slurm takes: {', '.join(OPTION_NAMES)})")
    roots = options.get("shared_roots")
    if (
        not isinstance(roots, list)
        or not roots
        or not all(isinstance(r, str) and os.path.isabs(r) for r in roots)
    ):
        raise ValueError("shared_roots must be a list of absolute directories the compute nodes see")
    shared_roots = tuple(Path(root) for root in roots)
    partition = options.get("partition", "")
    if not isinstance(partition, str) or any(c.isspace() for c in partition):
        raise ValueError("partition must be a partition name")
    poll = options.get("poll_seconds", 1.0)
    if not isinstance(poll, int | float) or isinstance(poll, bool) or not 0.05 <= poll <= 60:
        raise ValueError("poll_seconds must be a number of seconds from 0.05 to 60")
    commands = {name: _command(options, name) for name in ("sbatch", "squeue", "scancel", "srun")}
    python = options.get("python", sys.executable)
    if not isinstance(python, str) or not os.path.isabs(python):
        raise ValueError("python must be the absolute path of the interpreter that runs the shim")
    passed = options.get("pass_env", [])
    if not isinstance(passed, list) or not all(isinstance(name, str) for name in passed):
        raise ValueError("pass_env must be a list of environment variable names")
    settings = Settings(
        shared_roots=shared_roots,
        partition=partition,
        poll_seconds=float(poll),
        python=python,
        pass_env=tuple(passed),
        **commands,
    )
    for what, path in (
        ("the agent's state_dir", context.state_dir.absolute()),
        ("python", Path(python)),
        ("the shim's batch entry", BATCH_ENTRY),
    ):
        if not settings.shared(path):
            raise ValueError(f"{what} {path} is not under shared_roots: the compute nodes could not reach it")
    return SlurmRunner(context, settings)


def _command(options: Mapping[str, object], name: str) -> str:
    configured = options.get(name)
    if configured is not None:
        if not isinstance(configured, str) or not configured:
            raise ValueError(f"{name} must be the path of Slurm's {name} command")
        return configured
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"{name} is not on PATH: install Slurm's commands or set {name} to its path")
    return found


@dataclass(frozen=True, slots=True)
class Settings:
    shared_roots: tuple[Path, ...]
    partition: str
    poll_seconds: float
    python: str
    pass_env: tuple[str, ...]
    sbatch: str
    squeue: str
    scancel: str
    srun: str

    def shared(self, path: Path) -> bool:
        """Whether ``path`` is on a filesystem the compute nodes see (by its absolute path)."""
        absolute = Path(os.path.abspath(path))
        return any(absolute.is_relative_to(os.path.abspath(root)) for root in self.shared_roots)


# ---------------------------------------------------------------------------------------------------------
# What Slurm says of a job


@dataclass(frozen=True, slots=True)
class SlurmState:
    """One job as ``squeue --json`` shows it."""

    job_id: int
    name: str
    state: str
    """``PENDING``, ``RUNNING``, ``COMPLETED``, ``TIMEOUT``, ..."""
    reason: str
    """Why it waits (``Resources``, ``Priority``, ``QOSMaxJobsPerUserLimit``, ``BeginTime``) or ended."""
    wait_status: int = 0
    """The batch step's end as a wait(2) status (exit code << 8, or the signal)."""

    @property
    def waiting(self) -> bool:
        return self.state in WAITING

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def parse_squeue(document: str) -> dict[int, SlurmState]:
    """The jobs of ``squeue --json`` output (openapi v0.0.38, Slurm 22.05), by id."""
    jobs = json.loads(document).get("jobs", [])
    return {
        int(job["job_id"]): SlurmState(
            job_id=int(job["job_id"]),
            name=str(job.get("name", "")),
            state=str(job.get("job_state", "")),
            reason=str(job.get("state_reason", "")),
            wait_status=int(job.get("exit_code") or 0),
        )
        for job in jobs
    }


def job_name(assignment: Assignment, agent_id: str) -> str:
    """``takeoff.{item}.{epoch}.{agent}.{lease}``: what runs, and whose it is."""
    item = assignment.item.rsplit("/", 1)[-1]
    return f"{NAME_PREFIX}{item}.{assignment.epoch}.{agent_id}.{assignment.lease_id}"


def lease_of(name: str, agent_id: str) -> str | None:
    """The lease id of a job this agent named (:func:`job_name`); None for any other job."""
    if not name.startswith(NAME_PREFIX):
        return None
    _, agent, lease = name.rsplit(".", 2)
    return lease if agent == agent_id else None


def ended_by_slurm(state: SlurmState, recorded: JobExit | None) -> JobExit | None:
    """How a job ended when Slurm, not the job, decided it (a limit, a preemption, a node), or when the shim
    recorded nothing; None: the shim's record says it."""
    exit_code = recorded.exit_code if recorded else None
    if state.state in INFRASTRUCTURE_ENDS:
        reason, message = INFRASTRUCTURE_ENDS[state.state]
        return JobExit(exit_code, failure=RunnerFailure(reason, message))
    if state.state in LIMIT_ENDS:
        return JobExit(exit_code, failure=RunnerFailure(FailureReason.JOB_FAILED, LIMIT_ENDS[state.state]))
    if state.state == "OUT_OF_MEMORY":
        return JobExit(exit_code if exit_code is not None else 128 + signal.SIGKILL, oom_killed=True)
    if recorded is not None:
        return None
    if state.state == "CANCELLED":
        message = "Slurm cancelled the job before it ended (scancel, or an administrator)"
        return JobExit(None, failure=RunnerFailure(FailureReason.RUNNER_INFRA, message))
    code, killed_by = state.wait_status >> 8, state.wait_status & 0x7F
    message = (
        f"the batch job ended ({state.state}, exit code {code}"
        + (f", signal {killed_by}" if killed_by else "")
        + f") without the shim recording the job's end: see {SLURM_LOG} in the run's log"
    )
    return JobExit(None, failure=RunnerFailure(FailureReason.RUNNER_INFRA, message))


class SlurmQueue:
    """``squeue --json`` for every waiting job at once: one call per poll interval, however many jobs."""

    def __init__(self, squeue: str) -> None:
        self.squeue = squeue
        self._jobs: dict[int, SlurmState] = {}
        self._taken = -1.0
        self._lock = asyncio.Lock()

    async def jobs(self, after: float) -> dict[int, SlurmState]:
        """Slurm's jobs as seen after ``after`` (``time.monotonic()``): a waiter shares the answer of a call
        that began once it was waiting. Raises RunnerUnavailable when squeue fails."""
        async with self._lock:
            if self._taken <= after:
                started = time.monotonic()
                output = await _run(self.squeue, "--json", "--states=all")
                try:
                    self._jobs = parse_squeue(output)
                except (ValueError, KeyError, TypeError) as error:
                    raise RunnerUnavailable(
                        f"squeue --json answered what it could not read: {error}"
                    ) from error
                self._taken = started
            return self._jobs


async def _run(*argv: str, env: Mapping[str, str] | None = None) -> str:
    """``argv``'s standard output; RunnerUnavailable with its message when it fails."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as error:
        raise RunnerUnavailable(f"cannot run {argv[0]}: {error.strerror}") from error
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        said = stderr.decode(errors="replace").strip() or f"exit code {process.returncode}"
        raise RunnerUnavailable(f"{Path(argv[0]).name}: {said}")
    return stdout.decode(errors="replace")


async def cancel(scancel: str, job_id: int) -> None:
    """``scancel`` the job (Slurm: SIGTERM to every process, ``KillWait``, SIGKILL); a job that has ended
    meanwhile is not an error."""
    try:
        await _run(scancel, str(job_id))
    except RunnerUnavailable as failed:
        if "already completing or completed" not in str(failed) and "Invalid job id" not in str(failed):
            raise


# ---------------------------------------------------------------------------------------------------------
# The runner


class SlurmRunner:
    kind = ResourceKind.SLURM
    needs_pushed_image = False

    def __init__(self, context: RunnerContext, settings: Settings) -> None:
        self.context = context
        self.settings = settings
        self.sdk_site = write_sdk_site(context.state_dir / "sdk")
        self.queue = SlurmQueue(settings.squeue)

    def build_kind(self, source: SourceKind) -> BuildKind:
        return venv_build(self.kind, source)

    def check(self, assignment: Assignment) -> None:
        self.build_kind(assignment.job_version.source)
        config = assignment.resource_config
        extra = config.get("sbatch") or {}
        refused = set(config) - SLURM_OPTIONS
        refused |= {f"sbatch.{name}" for name in set(extra) - SBATCH_EXTRA_OPTIONS}
        refuse_other_options(self.kind, refused, SLURM_OPTIONS)

    def job(self, assignment: Assignment, lease_dir: Path) -> SlurmJob:
        return SlurmJob(self, assignment, lease_dir)

    async def sweep(self, held: Collection[str]) -> None:
        """Cancel this agent's Slurm jobs whose lease it does not hold (Slurm stops them: SIGTERM, its
        ``KillWait``, SIGKILL); the agent then removes their lease directories."""
        jobs = await self.queue.jobs(time.monotonic())
        for job in jobs.values():
            lease = lease_of(job.name, self.context.agent_id)
            if lease is not None and not job.ended and lease not in held:
                logger.info(
                    "cancelling Slurm job %s of lease %s, which this agent no longer holds", job.job_id, lease
                )
                await cancel(self.settings.scancel, job.job_id)

    async def close(self) -> None:
        pass


def sbatch_arguments(config: Mapping[str, object], default_partition: str) -> list[str]:
    """The resource config's sbatch options: those of the same name, then its ``sbatch`` extras
    (``mail_type: END`` is ``--mail-type=END``, ``exclusive: true`` is ``--exclusive``)."""
    values: dict[str, object] = {"partition": default_partition} if default_partition else {}
    values |= {name: config[name] for name in OPTION_FLAGS if name in config}
    arguments = [
        f"{OPTION_FLAGS[name]}={value}"
        for name, value in values.items()
        if not (name == "gpus_per_node" and value == 0)
    ]
    extra = config.get("sbatch") or {}
    assert isinstance(extra, Mapping)
    for name, value in sorted(extra.items()):
        flag = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value is not False:
            arguments.append(f"{flag}={value}")
    return arguments


def batch_script(python: str, lease_dir: Path, assignment: Assignment) -> str:
    """The batch script: the shim, run by the agent's interpreter in the batch step."""
    return (
        "#!/bin/sh\n"
        f"# Takeoff: attempt {assignment.attempt} of {assignment.item} (lease {assignment.lease_id})\n"
        f"exec {shlex.quote(python)} -P {shlex.quote(str(BATCH_ENTRY))} batch {shlex.quote(str(lease_dir))}\n"
    )


@dataclass
class SlurmJob:
    """One attempt's Slurm job, found through its lease directory (and, before its id was recorded, by its
    name)."""

    runner: SlurmRunner
    assignment: Assignment
    lease_dir: Path
    world: World = field(init=False)
    _local: LocalProcessJob = field(init=False)
    _job_id: int | None = field(init=False, default=None)
    _state: SlurmState | None = field(init=False, default=None)
    _submitting: asyncio.Future[None] | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)
    _outputs: list[JobOutput] = field(init=False)

    def __post_init__(self) -> None:
        self.lease_dir = self.lease_dir.absolute()
        self.world = world_of(self.assignment.resource_config)
        # The job runs as a local process would, in the batch step: the same environment and secrets.
        self._local = LocalProcessJob(self.lease_dir, self.runner.sdk_site, self.runner.settings.pass_env)
        launcher = shim_output(self.lease_dir)  # srun's own output in a multi-node launch
        ranks = shim_output(self.lease_dir, self.world) if self.world.multi else []
        self._outputs = [*launcher, *ranks, JobOutput(LogStream.STDERR, LogTail(self.lease_dir / SLURM_LOG))]

    @property
    def name(self) -> str:
        return job_name(self.assignment, self.runner.context.agent_id)

    @property
    def started(self) -> bool:
        return (self.lease_dir / "spec.json").exists()

    def log_sources(self) -> list[JobOutput]:
        return self._outputs

    async def start(self, launch: Launch) -> None:
        check_names(launch)
        settings = self.runner.settings
        built = launch.built
        for what, path in (
            ("lease directory", self.lease_dir),
            ("venv", Path(built.venv_path)),
            ("code", Path(built.code_path)),
            ("SDK site", self.runner.sdk_site),
        ):
            if not settings.shared(path):
                raise RunnerRefused(
                    f"the job's {what} {path} is not under the slurm runner's shared_roots"
                    f" ({', '.join(map(str, settings.shared_roots))}): the compute nodes could not reach it"
                )
        if launch.secret_files:
            await asyncio.to_thread(write_secret_files, self._local.secrets_dir, launch.secret_files)
        work_dir = self.lease_dir / "work"
        await asyncio.to_thread(copy_code, Path(built.code_path), work_dir)
        context_dir = self.assignment.job_version.build_context
        spec: dict[str, object] = {
            "argv": self._argv(built.python_path or str(Path(built.venv_path) / "bin" / "python")),
            "env": self._local.environment(launch),
            "cwd": str(work_dir / context_dir) if context_dir else str(work_dir),
            "stop_grace_seconds": launch.stop_grace_seconds,
        }
        if self.world.multi:
            spec[MULTI_NODE_KEY] = [self.world.nodes, self.world.procs_per_node]
        write_private(self.lease_dir / "spec.json", spec)
        script = self.lease_dir / "batch.sh"
        script.write_text(batch_script(settings.python, self.lease_dir, self.assignment))
        # Submitted to the end even if the start is cancelled meanwhile: stop() then finds the job by its id.
        self._submitting = asyncio.ensure_future(self._submit(script))
        await asyncio.shield(self._submitting)
        await self._until_running(launch.report)

    def _argv(self, python: str) -> list[str]:
        argv = list(self.assignment.entrypoint)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = python
        if not self.world.multi:
            return argv
        # srun writes each rank's output where the shim would (stdout.rank0.log ...): %t is the rank
        stdout, stderr = (
            str(self.lease_dir / name.replace(".rank0.", ".rank%t.")) for name in output_files(0)
        )
        return [
            self.runner.settings.srun,
            "--kill-on-bad-exit=1",
            f"--output={stdout}",
            f"--error={stderr}",
            self.runner.settings.python,
            "-P",
            str(BATCH_ENTRY),
            "rank",
            str(self.world.nodes),
            str(self.world.procs_per_node),
            "--",
            *argv,
        ]

    def sbatch_command(self, script: Path) -> list[str]:
        """The whole ``sbatch`` command line of the attempt."""
        return [
            self.runner.settings.sbatch,
            "--parsable",
            f"--job-name={self.name}",
            f"--output={self.lease_dir / SLURM_LOG}",
            f"--chdir={self.lease_dir}",
            "--export=ALL",  # of sbatch's own environment: see _submit
            "--no-requeue",  # a retry is the queue's: a new attempt, a new epoch
            *sbatch_arguments(self.assignment.resource_config, self.runner.settings.partition),
            str(script),
        ]

    async def _submit(self, script: Path) -> None:
        try:
            # sbatch runs with what a local process may see of the agent's environment, which the batch
            # step gets (--export=ALL): the agent's other variables, its credentials among them, are not the
            # job's. (--export=NONE or NIL would have slurmd load the user's login environment: seconds.)
            environment = agent_environment(self.runner.settings.pass_env)
            if SLURM_CONF in os.environ:
                environment[SLURM_CONF] = os.environ[SLURM_CONF]
            answer = await _run(*self.sbatch_command(script), env=environment)
        except RunnerUnavailable as failed:
            if "Batch job submission failed" in str(failed):  # the controller refused the request itself
                raise RunnerRefused(str(failed)) from None
            raise
        job_id = int(answer.strip().split(";")[0])  # "id" or "id;cluster"
        write_atomically(self.lease_dir / JOB_RECORD, {"job_id": job_id})
        self._job_id = job_id

    async def _find(self) -> int | None:
        """The job's Slurm id: recorded, or (submitted just before an agent crash) found by its name."""
        if self._job_id is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._job_id = int(json.loads((self.lease_dir / JOB_RECORD).read_text())["job_id"])
        if self._job_id is None and self.started:
            jobs = await self.runner.queue.jobs(time.monotonic())
            self._job_id = next((job.job_id for job in jobs.values() if job.name == self.name), None)
        return self._job_id

    async def _observe(self, after: float) -> SlurmState | None:
        """The job as Slurm shows it now (None: not, or no longer, known to Slurm)."""
        job_id = await self._find()
        if job_id is None:
            return None
        self._state = (await self.runner.queue.jobs(after)).get(job_id)
        return self._state

    async def _until_running(self, report: Callable[[str], Awaitable[object]] | None) -> None:
        """Return once the job runs or has ended; while it waits, tell Slurm's reason (``Resources``,
        ``Priority``, ``QOSMaxJobsPerUserLimit``, ...) as the item's detail."""
        told = ""
        after = time.monotonic()
        while True:
            state = await self._observe(after)
            if self._recorded_exit() is not None or state is None or not state.waiting:
                return
            if report is not None and state.reason not in ("", "None", told):
                told = state.reason
                await report(f"Slurm job {state.job_id} pending: {state.reason}")
            after = time.monotonic()
            await asyncio.sleep(self.runner.settings.poll_seconds)

    async def until_running(self) -> None:
        await self._until_running(None)

    def _recorded_exit(self) -> JobExit | None:
        try:
            data = json.loads((self.lease_dir / "exit.json").read_text())
        except (OSError, ValueError):
            return None
        exit_code, killed_by = data["exit_code"], data["signal"]
        if killed_by is None and 128 < exit_code <= 192 and self.world.multi:
            killed_by = exit_code - 128  # srun reports a rank killed by a signal as 128 + n
        return JobExit(exit_code=exit_code, signal=killed_by, fenced=data["fenced"], rank=data.get("rank"))

    def exit(self) -> JobExit | None:
        recorded = self._recorded_exit()
        if self._state is not None and self._state.ended:
            return ended_by_slurm(self._state, recorded) or recorded
        return recorded

    async def wait(self) -> JobExit:
        """The job's end: once Slurm says the job ended (or has forgotten it) and the shim's record is read,
        or one of the two, the other not following within SETTLE_SECONDS."""
        half_seen: float | None = None
        after = time.monotonic()
        while True:
            try:
                state = await self._observe(after)
            except RunnerUnavailable as unavailable:  # the job runs on; the shim's record still counts
                logger.warning("cannot follow Slurm job %s: %s", self._job_id, unavailable)
                state = self._state
            recorded = self._recorded_exit()
            if recorded is not None and (state is None or state.ended):
                return self.exit() or recorded
            if recorded is not None or state is None or state.ended:
                half_seen = half_seen or time.monotonic()
                if time.monotonic() - half_seen > SETTLE_SECONDS:
                    return self.exit() or self._forgotten()
            after = time.monotonic()
            await asyncio.sleep(self.runner.settings.poll_seconds)

    def _forgotten(self) -> JobExit:
        message = f"Slurm no longer knows job {self._job_id}, and its shim recorded no end"
        return JobExit(None, failure=RunnerFailure(FailureReason.RUNNER_INFRA, message))

    async def stop(self, grace: float) -> None:
        """Stop the job as its fence would: its lease deadline moves to now, so the shim stops the job
        (SIGTERM, the grace, SIGKILL) and records its end. (``scancel --signal`` reaches every process of
        the batch step, the shim too, which would end without a record and cut the job's grace short.) A
        job still pending, or whose shim does not answer within the grace and EXIT_RECORD_SECONDS, is
        cancelled with ``scancel``."""
        self._stopping = True
        if self._submitting is not None:
            with contextlib.suppress(Exception):
                await self._submitting
        job_id = await self._find()
        if job_id is None or self._recorded_exit() is not None:
            return
        state = await self._observe(time.monotonic())
        if state is not None and not state.waiting and not state.ended:
            with contextlib.suppress(FileNotFoundError):
                write_atomically(self.lease_dir / "lease_until", 0)
            deadline = time.monotonic() + grace + EXIT_RECORD_SECONDS
            while self._recorded_exit() is None and time.monotonic() < deadline:
                state = await self._observe(time.monotonic())
                if state is None or state.ended:
                    break
                await asyncio.sleep(min(self.runner.settings.poll_seconds, 0.2))
            if self._recorded_exit() is not None:
                return
            logger.warning(
                "the shim of Slurm job %s did not record its stopped job's end: cancelling it", job_id
            )
        if state is None or state.ended:
            return
        await cancel(self.runner.settings.scancel, job_id)
        while True:
            state = await self._observe(time.monotonic())
            if state is None or state.ended:
                return
            await asyncio.sleep(self.runner.settings.poll_seconds)

    async def renew_lease(self, until: float) -> None:
        """Tell the shim (on the shared filesystem) the agent's leases are good until ``until``; not once
        the job is being stopped (its deadline is now)."""
        if self._stopping:
            return
        with contextlib.suppress(FileNotFoundError):  # a lease forgotten meanwhile has no shim to tell
            write_atomically(self.lease_dir / "lease_until", until)
