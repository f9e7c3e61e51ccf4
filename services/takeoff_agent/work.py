"""One attempt of one item on this agent, from Assignment to Complete (docs/design.md §7).

create the run -> BUILDING (venv build, its log into the run) -> STARTING (fresh work directory, the job
under its shim) -> RUNNING (output into the run's logs as it comes) -> the outcome -> Complete. What an
attempt needs to be taken back after an agent restart lives in its lease directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from takeoff.v1 import build_pb2, common_pb2, queue_pb2, runs_pb2
from takeoff_agent.clients import Builder, LogLine, Runs
from takeoff_agent.local_process import JobExit, JobSpec, LocalJob, copy_code
from takeoff_agent.log_tail import LogTail
from takeoff_agent.sdk_site import matches_agent_python
from takeoff_agent.shim import write_atomically
from takeoff_server.protovalues import struct_to_dict
from takeoff_server.validation import clip_utf8

logger = logging.getLogger(__name__)

Assignment = queue_pb2.LeaseResponse.Assignment
LOG_FLUSH_SECONDS = 0.2
LAST_LINES_IN_MESSAGE = 20
# The queue keeps the last 4 KiB of a Complete's message (queue.proto): a failure message is built to fit,
# so that clipping never drops its explanation.
MAX_OUTCOME_MESSAGE_BYTES = 4096
MAX_LINES_PER_CALL = 10_000  # the registry's limit per AppendLogs
MAX_BYTES_PER_CALL = 2 * 1024 * 1024  # well under the registry's 4 MiB receive limit
LINE_OVERHEAD_BYTES = 8


class Stop(enum.Enum):
    """Why the agent stops a job before it ends by itself."""

    CANCELLED = "cancelled by user"
    REVOKED = "lease revoked by the queue service"
    FENCED = "leases not renewed in time (agent cut off from the queue service)"
    START_TIMEOUT = "not running by the start deadline"
    MAX_RUN_TIME = "ran longer than its max run time"
    DRAINED = "agent draining: drain timeout reached"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What Complete reports; None for work the agent must not report on (revoked, fenced)."""

    state: common_pb2.ItemState.ValueType
    reason: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED
    exit_code: int | None = None
    message: str = ""


class Reporter(Protocol):
    """How an attempt talks to the queue service (through the agent's Lease link)."""

    async def progress(
        self, attempt: Attempt, state: common_pb2.ItemState.ValueType, detail: str
    ) -> bool: ...
    async def complete(self, attempt: Attempt, outcome: Outcome) -> None: ...


@dataclass
class AgentContext:
    agent_name: str
    registry_address: str
    runs: Runs
    builder: Builder
    stop_grace_seconds: float
    sdk_site: Path
    """A ``sitecustomize`` directory that makes the SDK importable in job venvs (see ``sdk_site``)."""


@dataclass
class RunLog:
    """Lines on their way to the run's log, each stored exactly once even across agent restarts.

    Before lines are sent they are recorded in ``checkpoint``: the log index of the first, the lines, the
    offsets in the job's files just past them, and the job's last lines so far. A restarted agent sends the
    recorded lines again at the same index (the registry skips lines it has stored already: AppendLogs
    ``first_line_index``) and reads the job's files on from the recorded offsets, so a crash between
    sending and recording neither loses nor repeats a line. While lines wait to be sent, the job's files
    keep the newer ones.
    """

    runs: Runs
    run: str
    checkpoint: Path
    tails: list[tuple[runs_pb2.LogStream.ValueType, LogTail]]
    next_index: int = 0
    pending: list[LogLine] = field(default_factory=list)
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=LAST_LINES_IN_MESSAGE))
    _recorded: bool = field(default=True, init=False)
    """Whether ``checkpoint`` holds ``pending`` (after lines it also holds that are sent by now)."""

    def restore(self) -> None:
        """Take up where an earlier run of this agent recorded it stood."""
        try:
            recorded = json.loads(self.checkpoint.read_text())
        except (OSError, ValueError):
            return
        self.next_index = recorded["next_index"]
        for (_, tail), offset in zip(self.tails, recorded["offsets"], strict=True):
            tail.offset = offset
        self.pending = [LogLine(stream, text) for stream, text in recorded["pending"]]
        self.last_lines.extend(recorded["last_lines"])
        self._recorded = True

    def add(self, stream: runs_pb2.LogStream.ValueType, lines: list[str]) -> None:
        if not lines:
            return
        self.pending.extend(LogLine(stream, line) for line in lines)
        self._recorded = False
        if stream in (runs_pb2.LOG_STREAM_STDOUT, runs_pb2.LOG_STREAM_STDERR):
            self.last_lines.extend(lines)

    def system(self, text: str) -> None:
        self.add(runs_pb2.LOG_STREAM_SYSTEM, [f"[takeoff] {text}"])

    def read_job_output(self, *, final: bool = False) -> None:
        """The job's new lines; not while earlier ones still wait to be sent, unless the job has ended."""
        if self.pending and not final:
            return
        for stream, tail in self.tails:
            self.add(stream, tail.read_lines(final=final))

    async def flush(self) -> None:
        if not self._recorded:
            # Off the event loop, which also answers the lease: a chatty job's pending lines run to megabytes.
            await asyncio.to_thread(
                write_atomically,
                self.checkpoint,
                {
                    "next_index": self.next_index,
                    "offsets": [tail.offset for _, tail in self.tails],
                    "pending": [[line.stream, line.text] for line in self.pending],
                    "last_lines": list(self.last_lines),  # for the failure message of a job that ends later
                },
            )
            self._recorded = True
        while self.pending:
            batch = _next_batch(self.pending)
            await self.runs.append_logs(self.run, batch, self.next_index)
            self.next_index += len(batch)
            del self.pending[: len(batch)]


def _next_batch(lines: list[LogLine]) -> list[LogLine]:
    """As many leading lines as fit one AppendLogs call (at least one)."""
    size = 0
    for count, line in enumerate(lines[:MAX_LINES_PER_CALL]):
        size += len(line.text.encode()) + LINE_OVERHEAD_BYTES
        if size > MAX_BYTES_PER_CALL and count:
            return lines[:count]
    return lines[:MAX_LINES_PER_CALL]


class Attempt:
    def __init__(
        self, assignment: Assignment, lease_dir: Path, context: AgentContext, reporter: Reporter
    ) -> None:
        self.assignment = assignment
        self.lease_dir = lease_dir
        self.context = context
        self.reporter = reporter
        self.job = LocalJob(lease_dir)
        self.state = common_pb2.ITEM_STATE_LEASED
        self.detail = ""
        given = assignment.assign_time
        self.assigned_at = given.ToNanoseconds() / 1e9 if assignment.HasField("assign_time") else time.time()
        self.running_since: float | None = None
        self.stop_reason: Stop | None = None
        self._stop_requested = asyncio.Event()
        self.log = RunLog(
            context.runs,
            assignment.run,
            lease_dir / "log_checkpoint.json",
            [
                (runs_pb2.LOG_STREAM_STDOUT, LogTail(self.job.stdout)),
                (runs_pb2.LOG_STREAM_STDERR, LogTail(self.job.stderr)),
            ],
        )
        self.log.restore()
        self._restore_progress()
        self.task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def lease_id(self) -> str:
        return self.assignment.lease_id

    @classmethod
    def record(cls, assignment: Assignment, lease_dir: Path) -> None:
        """Keep the assignment on disk before any work starts, so a restarted agent can report it held."""
        lease_dir.mkdir(parents=True, exist_ok=True)
        partial = lease_dir / "assignment.bin.partial"
        partial.write_bytes(assignment.SerializeToString())
        partial.replace(lease_dir / "assignment.bin")

    @classmethod
    def recorded(cls, lease_dir: Path) -> Assignment | None:
        try:
            return Assignment.FromString((lease_dir / "assignment.bin").read_bytes())
        except OSError:
            return None

    @property
    def _progress_file(self) -> Path:
        return self.lease_dir / "progress.json"

    def _restore_progress(self) -> None:
        """What an earlier run of this agent decided: when the job began running (its max run time
        counts from then) and why the agent stopped it (the outcome it reports)."""
        try:
            progress = json.loads(self._progress_file.read_text())
        except (OSError, ValueError):
            return
        self.running_since = progress["running_since"]
        if progress["stop_reason"] is not None:
            self.request_stop(Stop[progress["stop_reason"]])

    def _record_progress(self) -> None:
        # Revoked and fenced are not kept: after a restart, the queue's Welcome says whether the lease holds.
        kept_reason = self.stop_reason if self.stop_reason not in (Stop.REVOKED, Stop.FENCED) else None
        progress = {"running_since": self.running_since, "stop_reason": kept_reason and kept_reason.name}
        with contextlib.suppress(FileNotFoundError):  # work already forgotten has nothing left to record
            write_atomically(self._progress_file, progress)

    def _arm_deadlines(self) -> None:
        """The agent enforces the start deadline and the max run time itself (the queue is the backstop)."""
        loop = asyncio.get_running_loop()
        if self.assignment.HasField("start_deadline") and self.state != common_pb2.ITEM_STATE_RUNNING:
            deadline = self.assignment.start_deadline.ToNanoseconds() / 1e9
            self._timers.append(loop.call_later(max(0.0, deadline - time.time()), self._check_started))
        if self.assignment.HasField("max_run_time") and self.running_since is not None:
            limit = self.assignment.max_run_time.ToTimedelta().total_seconds()
            remaining = self.running_since + limit - time.time()
            self._timers.append(loop.call_later(max(0.0, remaining), self.request_stop, Stop.MAX_RUN_TIME))

    def _check_started(self) -> None:
        if self.state != common_pb2.ITEM_STATE_RUNNING:
            self.request_stop(Stop.START_TIMEOUT)

    def request_stop(self, reason: Stop) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._record_progress()
        self._stop_requested.set()

    async def run(self) -> None:
        self._arm_deadlines()
        try:
            outcome = await self._attempt()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an agent-side failure: retryable, and said so in the run's log
            logger.exception("attempt %s failed inside the agent", self.assignment.run)
            outcome = Outcome(
                common_pb2.ITEM_STATE_FAILED,
                common_pb2.FAILURE_REASON_RUNNER_INFRA,
                message=f"the agent could not run the job: {error}",
            )
            self.log.system(outcome.message)
        finally:
            for timer in self._timers:
                timer.cancel()
        await self._flush_logs_quietly()
        if outcome is not None and self.stop_reason not in (Stop.REVOKED, Stop.FENCED):
            await self.reporter.complete(self, outcome)

    async def _attempt(self) -> Outcome | None:
        assignment = self.assignment
        if not self.job.started:
            await self.context.runs.create(
                assignment.run,
                job_version=assignment.job_version.name,
                item=assignment.item.name,
                attempt=assignment.attempt,
                config=struct_to_dict(assignment.item.run_config),
                display_name=assignment.item.run_display_name,
            )
            self.log.system(
                f"attempt {assignment.attempt} of {assignment.item.name} on {self.context.agent_name}"
            )
            if not await self._advance(common_pb2.ITEM_STATE_BUILDING, "venv build"):
                return None
            built = await self._build()
            if isinstance(built, Outcome):
                return built
            if self.stop_reason is not None:
                return await self._stopped_before_start()
            if not await self._advance(common_pb2.ITEM_STATE_STARTING, "starting the job"):
                return None
            await self._start(built)
        if not await self._advance(common_pb2.ITEM_STATE_RUNNING, "running"):
            await self.job.stop(self.context.stop_grace_seconds)
            return None
        if self.running_since is None:
            self.running_since = time.time()
            self._record_progress()
            self._arm_deadlines()
        ended = await self._watch()
        return await self._conclude(ended)

    async def _advance(self, state: common_pb2.ItemState.ValueType, detail: str) -> bool:
        self.state, self.detail = state, detail
        return await self.reporter.progress(self, state, detail)

    async def _build(self) -> build_pb2.BuildResult | Outcome:
        result = None
        async for event in self.context.builder.build(
            self.assignment.job_version.name, build_pb2.BUILD_KIND_VENV, self.assignment.run
        ):
            match event.WhichOneof("event"):
                case "log":
                    self.log.add(runs_pb2.LOG_STREAM_BUILD, list(event.log.lines))
                case "cache":
                    self.log.system(f"build {event.build}: {'cache hit' if event.cache.hit else 'building'}")
                case "result":
                    result = event.result
                case "failure":
                    failure = event.failure
                    self.log.system(f"build failed: {failure.message}")
                    return Outcome(
                        common_pb2.ITEM_STATE_FAILED,
                        failure.reason or common_pb2.FAILURE_REASON_BUILD_FAILED,
                        message=failure_message(failure.message, failure.log_tail[-LAST_LINES_IN_MESSAGE:]),
                    )
        await self._flush_logs_quietly()
        if result is None:
            return Outcome(
                common_pb2.ITEM_STATE_FAILED,
                common_pb2.FAILURE_REASON_BUILD_INFRA,
                message="the build ended without a result",
            )
        return result

    def _environment(self, result: build_pb2.BuildResult) -> dict[str, str]:
        assignment = self.assignment
        version = assignment.job_version
        job_name = version.name.split("/jobs/", 1)[1].replace("/versions/", ":v")
        venv_bin = str(Path(result.venv_path) / "bin")
        configured = struct_to_dict(assignment.resource_config).get("env", {})
        sdk = (
            {"PYTHONPATH": str(self.context.sdk_site)} if matches_agent_python(Path(result.venv_path)) else {}
        )
        return {
            **os.environ,
            **sdk,
            **{key: str(value) for key, value in configured.items()},
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": result.venv_path,
            "PYTHONUNBUFFERED": "1",
            "TAKEOFF_REGISTRY": self.context.registry_address,
            "TAKEOFF_PROJECT": assignment.run.split("/runs/", 1)[0].removeprefix("projects/"),
            "TAKEOFF_RUN_ID": assignment.run.rsplit("/", 1)[1],
            "TAKEOFF_JOB": job_name,
            "TAKEOFF_QUEUE": assignment.queue,
            "TAKEOFF_ITEM": assignment.item.name,
            "TAKEOFF_ATTEMPT": str(assignment.attempt),
            "TAKEOFF_CONFIG": json.dumps(struct_to_dict(assignment.item.run_config)),
            "TRACEPARENT": assignment.traceparent,
        }

    async def _start(self, result: build_pb2.BuildResult) -> None:
        work_dir = self.lease_dir / "work"
        await asyncio.to_thread(copy_code, Path(result.code_path), work_dir)
        context_dir = self.assignment.job_version.environment.build_context
        argv = list(self.assignment.entrypoint)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = result.python_path or str(Path(result.venv_path) / "bin" / "python")
        await self.job.start(
            JobSpec(
                argv=argv,
                env=self._environment(result),
                cwd=str(work_dir / context_dir) if context_dir else str(work_dir),
                stop_grace_seconds=self.context.stop_grace_seconds,
            )
        )
        self.log.system(f"started {' '.join(self.assignment.entrypoint)}")

    async def _watch(self) -> JobExit:
        """Follow the job's output into the run until it ends, stopping it when asked to."""
        ended = asyncio.create_task(self.job.wait())
        stop_wanted = asyncio.create_task(self._stop_requested.wait())
        stopping: asyncio.Task[None] | None = None
        try:
            while not ended.done():
                await asyncio.wait(
                    {ended, stop_wanted}, timeout=LOG_FLUSH_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_wanted.done() and stopping is None:
                    assert self.stop_reason is not None
                    self.log.system(f"stopping the job: {self.stop_reason.value}")
                    stopping = asyncio.create_task(self.job.stop(self.context.stop_grace_seconds))
                self.log.read_job_output()
                await self._flush_logs_quietly()
            self.log.read_job_output(final=True)
            if stopping is not None:
                await stopping
            return ended.result()
        finally:
            stop_wanted.cancel()

    async def _stopped_before_start(self) -> Outcome | None:
        if self.stop_reason is Stop.CANCELLED:
            await self.context.runs.finish(
                self.assignment.run, common_pb2.RUN_STATE_KILLED, exit_code=None, message=Stop.CANCELLED.value
            )
            return Outcome(
                common_pb2.ITEM_STATE_CANCELLED,
                common_pb2.FAILURE_REASON_CANCELLED,
                message=Stop.CANCELLED.value,
            )
        return await self._conclude(None)

    async def _conclude(self, ended: JobExit | None) -> Outcome | None:
        """The outcome of docs/design.md §7, and the run's final state when the job's SDK did not set one."""
        run = self.assignment.run
        exit_code = ended.exit_code if ended else None
        reason = (
            self.stop_reason
            if self.stop_reason is not None
            else (Stop.FENCED if ended and ended.fenced else None)
        )
        if reason is not None:
            self.log.system(f"job stopped: {reason.value}")
            await self.context.runs.finish(
                run, common_pb2.RUN_STATE_KILLED, exit_code=exit_code, message=reason.value
            )
            if reason is Stop.REVOKED or self.stop_reason is Stop.FENCED:
                return None  # the queue has given the lease away, or will: nothing to report
            if reason is Stop.CANCELLED:
                return Outcome(
                    common_pb2.ITEM_STATE_CANCELLED,
                    common_pb2.FAILURE_REASON_CANCELLED,
                    exit_code,
                    reason.value,
                )
            failure = {
                # Only the shim stopped it (the agent was away, or had not noticed yet): the queue may still
                # hold the lease for this agent, as it does when it keeps the lease across an agent restart.
                Stop.FENCED: common_pb2.FAILURE_REASON_AGENT_LOST,
                Stop.START_TIMEOUT: common_pb2.FAILURE_REASON_START_TIMEOUT,
                Stop.MAX_RUN_TIME: common_pb2.FAILURE_REASON_MAX_RUN_TIME_EXCEEDED,
                Stop.DRAINED: common_pb2.FAILURE_REASON_PREEMPTED,
            }[reason]
            return Outcome(common_pb2.ITEM_STATE_FAILED, failure, exit_code, reason.value)
        assert ended is not None
        self.log.system(f"job exited with code {ended.exit_code}")
        if ended.exit_code != 0:
            crashed = ended.signal is not None
            state = common_pb2.RUN_STATE_CRASHED if crashed else common_pb2.RUN_STATE_FAILED
            last_lines = list(self.log.last_lines)
            message = failure_message(
                f"exit code {ended.exit_code}" + ("; last lines:" if last_lines else ""), last_lines
            )
            await self.context.runs.finish(run, state, exit_code=ended.exit_code, message=message)
            return Outcome(
                common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, ended.exit_code, message
            )
        if await self.context.runs.state(run) == common_pb2.RUN_STATE_STARTING:
            message = "the job exited 0 but never called takeoff.init(), so it reported no run (NO_RUN)"
            self.log.system(message)
            await self.context.runs.finish(run, common_pb2.RUN_STATE_FAILED, exit_code=0, message=message)
            return Outcome(common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_NO_RUN, 0, message)
        await self.context.runs.finish(run, common_pb2.RUN_STATE_FINISHED, exit_code=0, message="")
        return Outcome(common_pb2.ITEM_STATE_SUCCEEDED, exit_code=0)

    async def abandon(self) -> None:
        """Stop the job of a lease the queue gave away while the agent was away, and end its run KILLED
        (the next attempt has its own run)."""
        self.request_stop(Stop.REVOKED)
        await self.job.stop(self.context.stop_grace_seconds)
        self.log.read_job_output(final=True)
        try:
            await self._conclude(self.job.exit())
        except Exception:  # the run may never have been created; the queue has moved on either way
            logger.warning("could not end the run of revoked lease %s", self.lease_id, exc_info=True)
        await self._flush_logs_quietly()

    async def _flush_logs_quietly(self) -> None:
        try:
            await self.log.flush()
        except Exception:  # logs must never cost the job its outcome; the next flush tries again
            logger.warning("could not send log lines of %s", self.assignment.run, exc_info=True)


def failure_message(explanation: str, last_lines: Sequence[str]) -> str:
    """``explanation`` then as many of ``last_lines`` (the newest) as fit in the queue's message limit."""
    explanation = clip_utf8(explanation, MAX_OUTCOME_MESSAGE_BYTES // 4)
    room = MAX_OUTCOME_MESSAGE_BYTES - len(explanation.encode())
    kept: list[str] = []
    for line in reversed(last_lines):
        size = len(line.encode()) + 1
        if size > room:
            if not kept:  # the newest line alone is too long: its start is still worth showing
                kept.append(clip_utf8(line, room - 1))
            break
        kept.append(line)
        room -= size
    return "\n".join([explanation, *reversed(kept)])
