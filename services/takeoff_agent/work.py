"""One attempt of one item on this agent, from Assignment to Complete (docs/design.md §7).

create the run -> BUILDING (the build the item's runner needs, its log into the run) -> STARTING (the job
started by its runner) -> RUNNING (output into the run's logs as it comes) -> the outcome -> Complete.
What an attempt needs to be taken back after an agent restart lives in its lease directory. The attempt
is the same whatever the resource kind: the runner (``runners/``) does what differs.

Its spans (docs/design.md §9) go under the queue's span of the attempt, which the Assignment's traceparent
names: ``agent.attempt``, and inside it the run's creation, the build (the builder's spans under it), the
job (``agent.job``, whose context the job gets as TRACEPARENT: its own spans go under it) with its start
and each wait the runner reports (``agent.wait``: free GPUs, a pending pod or Slurm job), and the run's
finish.
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
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from takeoff_agent.clients import Builder, LogLine, Runs
from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    Built,
    FailureReason,
    ItemState,
    JobExit,
    LogStream,
    Outcome,
    ResourceKind,
    RunState,
    SecretMount,
)
from takeoff_agent.relay import RunEnds
from takeoff_agent.runners.base import JobOutput, Launch, Runner, RunnerRefused, RunnerUnavailable
from takeoff_agent.shim import write_atomically
from takeoff_agent.wire import (
    build_kind_to_proto,
    built_from_proto,
    failure_reason_from_proto,
    log_stream_to_proto,
    run_state_to_proto,
)
from takeoff_rpc.status import decode_rpc_error, status_code
from takeoff_server.telemetry import (
    derived_span_id,
    exporting,
    parent_context,
    span_with_id,
    untraced,
    with_span_id,
)
from takeoff_server.validation import clip_utf8

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("takeoff.agent")
T = TypeVar("T")

LOG_FLUSH_SECONDS = 0.2
SLOW_STOP_SECONDS = 30.0
"""How long past its grace a job's stop may take before the agent says it is still waiting for it."""
LAST_LINES_IN_MESSAGE = 20
# The queue keeps the last 4 KiB of a Complete's message (queue.proto): a failure message is built to fit,
# so that clipping never drops its explanation.
MAX_OUTCOME_MESSAGE_BYTES = 4096
MAX_LINES_PER_CALL = 10_000  # the registry's limit per AppendLogs
MAX_BYTES_PER_CALL = 2 * 1024 * 1024  # well under the registry's 4 MiB receive limit
LINE_OVERHEAD_BYTES = 8
MASK = "***"
"""What a secret's value becomes in the job's output before it reaches the run's log."""
MIN_MASKED_CHARS = 4
"""Shorter values are not masked: replacing every ``1`` of a log would hide the log, not the secret."""
BUILD_DETAILS = {BuildKind.VENV: "venv build", BuildKind.IMAGE: "image build", BuildKind.NOOP: "image check"}
"""The BUILDING Progress detail: what the builder makes for this attempt."""
PASSED_TRACING_ENV = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_BSP_SCHEDULE_DELAY",
)
"""Where the agent exports spans, the job exports its own (the resource config's ``env`` may say
otherwise). The headers (``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``), which may hold a collector's token, go
as secret variables."""
PASSED_TRACING_SECRETS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")


class _Interrupted(enum.Enum):
    STOP = "stop requested"


class Stop(enum.Enum):
    """Why the agent stops a job before it ends by itself."""

    CANCELLED = "cancelled by user"
    REVOKED = "lease revoked by the queue service"
    FENCED = "leases not renewed in time (agent cut off from the queue service)"
    START_TIMEOUT = "not running by the start deadline"
    MAX_RUN_TIME = "ran longer than its max run time"
    DRAINED = "agent draining: drain timeout reached"


class Reporter(Protocol):
    """How an attempt talks to the queue service (through the agent's Lease link)."""

    async def progress(self, attempt: Attempt, state: ItemState, detail: str) -> bool:
        """Report progress; False when the lease is lost."""
        ...

    async def complete(self, attempt: Attempt, outcome: Outcome) -> None: ...


@dataclass
class AgentContext:
    agent_name: str
    runs: Runs
    builder: Builder
    runners: Mapping[ResourceKind, Runner]
    stop_grace_seconds: float
    job_registry_address: str
    """What jobs are given as TAKEOFF_REGISTRY (docs/design.md §16)."""
    job_ca_file: Path | None = None
    """The CA certificate jobs need to check that registry's TLS certificate (TAKEOFF_TLS_CA_FILE)."""
    run_ends: RunEnds = field(default_factory=RunEnds)
    """What the run relay saw the registry answer the jobs about their runs: an attempt whose job attached
    or ended its run through it spares the registry the calls that would ask or change nothing."""


@dataclass(frozen=True, slots=True)
class JobSecrets:
    """What the job gets besides its environment: secret environment variables (TAKEOFF_TOKEN and user
    secrets mounted as env) and secret files. Never logged, never recorded by the agent."""

    env: dict[str, str] = field(default_factory=dict, repr=False)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass
class RunLog:
    """Lines on their way to the run's log, each stored exactly once even across agent restarts.

    Before lines are sent they are recorded in ``checkpoint``: the log index of the first, the lines, the
    offsets in the job's output just past them (as its log sources count them), and the job's last lines
    so far. A restarted agent sends the recorded lines again at the same index (the registry skips lines it
    has stored already: AppendLogs ``first_line_index``) and reads the job's output on from the recorded
    offsets, so a crash between sending and recording neither loses nor repeats a line. While lines wait
    to be sent, the job's output keeps the newer ones.
    """

    runs: Runs
    run: str
    checkpoint: Path
    sources: list[JobOutput]
    next_index: int = 0
    pending: list[LogLine] = field(default_factory=list)
    build_lines: int = 0
    """Build output lines taken so far: a restarted agent asks for the same build again, whose output the
    builder sends from its first line, and skips that many."""
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=LAST_LINES_IN_MESSAGE))
    token: str | None = field(default=None, repr=False)
    """The run token the lines are sent with (None: the channel's key)."""
    _recorded: bool = field(default=True, init=False)
    """Whether ``checkpoint`` holds ``pending`` (after lines it also holds that are sent by now)."""
    _masks: list[str] = field(default_factory=list, init=False, repr=False)
    """Secret values replaced by :data:`MASK` in every line added, longest first."""
    _sending: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    """One flush at a time: a flush left to run in the background and the next one must not send the
    same lines at two indices."""

    def mask(self, values: Iterable[str | bytes]) -> None:
        """Replace ``values`` (and each line of a multi-line one) wherever a line added from now on
        holds them: a job that prints its token or a secret does not put it into the run's log, nor
        into the item's failure message (which quotes the last lines)."""
        masks = set(self._masks)
        for value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            for piece in (text, *text.splitlines()):
                if len(piece.strip()) >= MIN_MASKED_CHARS:
                    masks.add(piece.strip())
        self._masks = sorted(masks, key=len, reverse=True)

    def _masked(self, line: str) -> str:
        for secret in self._masks:
            if secret in line:
                line = line.replace(secret, MASK)
        return line

    def restore(self) -> None:
        """Take up where an earlier run of this agent recorded it stood."""
        try:
            recorded = json.loads(self.checkpoint.read_text())
        except (OSError, ValueError):
            return
        self.next_index = recorded["next_index"]
        for output, offset in zip(self.sources, recorded["offsets"], strict=True):
            output.source.offset = offset
        # [stream, text] in checkpoints of agents before multi-node launches, [stream, text, rank] since
        self.pending = [LogLine(*line) for line in recorded["pending"]]
        self.last_lines.extend(recorded["last_lines"])
        self.build_lines = recorded.get("build_lines", 0)  # absent from checkpoints of older agents
        self._recorded = True

    def add(self, stream: LogStream, lines: list[str], rank: int | None = None) -> None:
        if not lines:
            return
        if self._masks:
            lines = [self._masked(line) for line in lines]
        self.pending.extend(LogLine(log_stream_to_proto(stream), line, rank) for line in lines)
        self._recorded = False
        if stream is LogStream.BUILD:
            self.build_lines += len(lines)
        if stream in (LogStream.STDOUT, LogStream.STDERR):
            self.last_lines.extend(lines)

    def system(self, text: str) -> None:
        self.add(LogStream.SYSTEM, [f"[takeoff] {text}"])

    def read_job_output(self, *, final: bool = False) -> None:
        """The job's new lines; not while earlier ones still wait to be sent, unless the job has ended."""
        if self.pending and not final:
            return
        for output in self.sources:
            self.add(output.stream, output.source.read_lines(final=final), output.rank)

    async def flush(self) -> None:
        async with self._sending:
            await self._flush()

    async def _flush(self) -> None:
        if not self._recorded:
            # Off the event loop, which also answers the lease: a chatty job's pending lines run to megabytes.
            await asyncio.to_thread(
                write_atomically,
                self.checkpoint,
                {
                    "next_index": self.next_index,
                    "offsets": [output.source.offset for output in self.sources],
                    "pending": [[line.stream, line.text, line.rank] for line in self.pending],
                    "last_lines": list(self.last_lines),  # for the failure message of a job that ends later
                    "build_lines": self.build_lines,
                },
            )
            self._recorded = True
        while self.pending:
            batch = _next_batch(self.pending)
            with untraced():  # five calls a second for the job's life would bury its trace
                await self.runs.append_logs(self.run, batch, self.next_index, token=self.token)
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
        self.runner = context.runners[assignment.resource]
        self.job = self.runner.job(assignment, lease_dir)
        self.state = ItemState.LEASED
        self.detail = ""
        self.assigned_at = assignment.assign_time or time.time()
        self.running_since: float | None = None
        self.stop_reason: Stop | None = None
        self._stop_requested = asyncio.Event()
        self.token = assignment.run_token or None
        """The attempt's run token: every call about its run presents it (None: the agent's key)."""
        self.log = RunLog(
            context.runs,
            assignment.run,
            lease_dir / "log_checkpoint.json",
            self.job.log_sources(),
            token=self.token,
        )
        self.log.restore()
        if self.token:
            self.log.mask([self.token])
        self._restore_progress()
        self.task: asyncio.Task[None] | None = None
        self.job_traceparent = with_span_id(
            assignment.traceparent, derived_span_id(assignment.traceparent, "agent.job")
        )
        """The job's TRACEPARENT: its ``agent.job`` span, whose id a restarted agent gives it again."""
        self._job_span: trace.Span | None = None
        self._waiting: trace.Span | None = None
        self._creating: asyncio.Task[None] | None = None
        """CreateRun, under way while the attempt checks, reads its secrets and builds: whatever needs
        the run (its log, its end, the job) waits for it (:meth:`_run_created`)."""
        self._background: set[asyncio.Future[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._lease_until: float | None = None
        self._renewing: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> str:
        return self.assignment.lease_id

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
        deadline, limit = self.assignment.start_deadline, self.assignment.max_run_time
        if deadline is not None and self.state != ItemState.RUNNING:
            self._timers.append(loop.call_later(max(0.0, deadline - time.time()), self._check_started))
        if limit is not None and self.running_since is not None:
            remaining = self.running_since + limit - time.time()
            self._timers.append(loop.call_later(max(0.0, remaining), self.request_stop, Stop.MAX_RUN_TIME))

    def _check_started(self) -> None:
        if self.state != ItemState.RUNNING:
            self.request_stop(Stop.START_TIMEOUT)

    def request_stop(self, reason: Stop) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._record_progress()
        self._stop_requested.set()

    def renew_lease(self, until: float) -> None:
        """Pass the agent's renewed lease on to the job, in the background: a runner slow to answer (an API
        server) delays neither the Lease stream nor other jobs, and a renewal that arrives meanwhile is
        passed on once the one under way is done (only the newest matters)."""
        self._lease_until = until
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._pass_on_renewals())

    async def _pass_on_renewals(self) -> None:
        renewed = None
        while self._lease_until is not None and renewed != self._lease_until:
            renewed = self._lease_until
            try:
                await self.job.renew_lease(renewed)
            except Exception:  # the next renewal tries again; the runner's fence stops a job left behind
                logger.warning("could not renew the lease of %s's job", self.lease_id, exc_info=True)

    def _span_attributes(self) -> dict[str, AttributeValue]:
        assignment = self.assignment
        return {
            "takeoff.project": f"projects/{assignment.project}",
            "takeoff.queue": assignment.queue,
            "takeoff.item": assignment.item,
            "takeoff.attempt": assignment.attempt,
            "takeoff.agent": self.context.agent_name,
            "takeoff.run": assignment.run,
        }

    async def run(self) -> None:
        self.context.run_ends.watch(self.assignment.run)
        try:
            await self._traced_run()
        finally:
            self.context.run_ends.forget(self.assignment.run)

    async def _traced_run(self) -> None:
        with _tracer.start_as_current_span(
            "agent.attempt",
            parent_context(self.assignment.traceparent),
            attributes=self._span_attributes(),
        ) as span:
            try:
                outcome = await self._run()
            finally:
                self._end_job_span(None)  # a job the attempt gave up on without concluding
            if outcome is not None:
                span.set_attribute("takeoff.outcome", outcome.state.value)
                if outcome.state is not ItemState.SUCCEEDED:
                    span.set_attribute("takeoff.reason", outcome.reason.value)
                    span.set_status(trace.StatusCode.ERROR, outcome.message[:1024])
            elif self.stop_reason is not None:
                span.set_attribute("takeoff.outcome", self.stop_reason.name)

    async def _run(self) -> Outcome | None:
        self._arm_deadlines()
        try:
            return await self._run_to_completion()
        finally:
            for task in (self._creating, *self._background):
                if task is not None and not task.done():
                    task.cancel()  # the attempt was cancelled (the agent stops): nothing waits for them

    async def _run_to_completion(self) -> Outcome | None:
        try:
            outcome = await self._attempt()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an agent-side failure: retryable, and said so in the run's log
            logger.exception("attempt %s failed inside the agent", self.assignment.run)
            outcome = await self._failed_before_end(
                Outcome(
                    ItemState.FAILED,
                    FailureReason.RUNNER_INFRA,
                    message=f"the agent could not run the job: {error}",
                )
            )
        finally:
            for timer in self._timers:
                timer.cancel()
        await self._flush_logs_quietly()
        if outcome is not None and self.stop_reason is not Stop.REVOKED:
            await self.reporter.complete(self, outcome)
        return outcome

    async def _attempt(self) -> Outcome | None:
        assignment = self.assignment
        resumed = self.job.started  # by an earlier run of this agent
        if not resumed:
            # Nothing before the job's start depends on its run but the run's log, which waits for it:
            # CreateRun's round trip overlaps the checks, the secrets and the build instead of preceding them.
            self._creating = asyncio.create_task(self._create_run())
            self.log.system(f"attempt {assignment.attempt} of {assignment.item} on {self.context.agent_name}")
            if exporting() and (context := parent_context(assignment.traceparent)):
                # The run's log keeps the attempt's trace: its lines lead to the spans of the same attempt.
                trace_id = trace.get_current_span(context).get_span_context().trace_id
                self.log.system(f"trace {trace_id:032x}")
            try:
                self.runner.check(assignment)
                build_kind = self.runner.build_kind(assignment.job_version.source)
            except RunnerRefused as refused:
                return await self._failed_before_end(
                    Outcome(ItemState.FAILED, FailureReason.CONFIG_INVALID, message=str(refused))
                )
            secrets = await self._unless_stopped(self._secrets())
            if secrets is _Interrupted.STOP:
                return await self._end_stopped()
            if isinstance(secrets, Outcome):
                return await self._failed_before_end(secrets)
            # BUILDING goes to the queue while the build runs: a cached build, the usual case, need not
            # wait for the queue's commit first. The job starts only once the queue has taken it (a lost
            # lease stops the build, through request_stop).
            building = asyncio.ensure_future(self._advance(ItemState.BUILDING, BUILD_DETAILS[build_kind]))
            self._background.add(building)
            with _tracer.start_as_current_span(
                "agent.build", attributes={"takeoff.build_kind": build_kind.name.lower()}
            ) as build_span:
                built = await self._unless_stopped(self._build(build_kind))
                if isinstance(built, Built):
                    build_span.set_attribute("takeoff.cache_hit", built.cache_hit)
            if built is _Interrupted.STOP or self.stop_reason is not None:
                return await self._end_stopped()
            if isinstance(built, Outcome):
                return await self._failed_before_end(built)
            if await self._unless_stopped(building) is not True:
                return await self._end_stopped()
            await self._run_created()  # the job attaches to its run at once
            # After a cached build, STARTING goes to the queue while the job starts: the queue took this
            # attempt's BUILDING a few milliseconds ago, and a refusal stops the job just started (through
            # request_stop). After a build that took its time, the lease may have been lost meanwhile: the
            # queue's answer comes first, so that no job starts beside the next attempt's.
            starting = asyncio.ensure_future(self._advance(ItemState.STARTING, "starting the job"))
            self._background.add(starting)
            if not built.cache_hit and await self._unless_stopped(starting) is not True:
                return await self._end_stopped()
            job_span = self._open_job_span()
            if built.image:
                job_span.set_attribute("container.image.name", built.image)
            with (
                trace.use_span(job_span, end_on_exit=False),
                _tracer.start_as_current_span("agent.start"),
            ):
                try:
                    failed_start = await self._unless_stopped(self._start(built, secrets))
                finally:
                    self._report_waiting(None)
            if failed_start is _Interrupted.STOP or await self._unless_stopped(starting) is not True:
                return await self._end_stopped()
            if failed_start is not None:
                return await self._failed_before_end(failed_start)
        else:
            self._open_job_span(self.running_since)
            await self._mask_secrets_again()
        if (  # started before an agent restart and not seen running: its pod may still be pending
            resumed
            and self.running_since is None
            and await self._unless_stopped(self.job.until_running()) is _Interrupted.STOP
        ):
            return await self._end_stopped()
        if not await self._advance(ItemState.RUNNING, "running"):
            return await self._end_stopped()
        if self.running_since is None:
            self.running_since = time.time()
            self._record_progress()
            self._arm_deadlines()
        ended = await self._watch()
        return await self._conclude(ended)

    async def _create_run(self) -> None:
        assignment = self.assignment
        with _tracer.start_as_current_span("agent.create_run"):
            await self.context.runs.create(
                assignment.run,
                job_version=assignment.job_version.name,
                item=assignment.item,
                attempt=assignment.attempt,
                config=assignment.run_config,
                display_name=assignment.run_display_name,
                token=self.token,
            )

    async def _run_created(self) -> None:
        """Once the attempt's run exists; raises what CreateRun raised (each time it is asked)."""
        if self._creating is not None:
            await self._creating

    async def _unless_stopped(self, work: Awaitable[T]) -> T | _Interrupted:
        """``work``'s result, or STOP when a stop is requested first: ``work`` (a build that waits for
        its builder, a start that waits for GPUs or a pod) is then cancelled."""
        task = asyncio.ensure_future(work)
        stop_wanted = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({task, stop_wanted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wanted.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return _Interrupted.STOP if task.cancelled() else task.result()

    def _open_job_span(self, since: float | None = None) -> trace.Span:
        """``agent.job``, from the job's start (or ``since``, when it ran before an agent restart) to its
        end, under the id its TRACEPARENT names."""
        with span_with_id(derived_span_id(self.assignment.traceparent, "agent.job")):
            self._job_span = _tracer.start_span(
                "agent.job",
                attributes={
                    "takeoff.run": self.assignment.run,
                    "takeoff.resource": self.runner.kind.config_name,
                },
                start_time=None if since is None else int(since * 1e9),
            )
        return self._job_span

    def _end_job_span(self, ended: JobExit | None) -> None:
        span, self._job_span = self._job_span, None
        if span is None:
            return
        if ended is not None and ended.exit_code is not None:
            span.set_attribute("process.exit.code", ended.exit_code)
            if ended.exit_code != 0:
                span.set_status(trace.StatusCode.ERROR, f"exit code {ended.exit_code}")
        span.end()

    def _report_waiting(self, detail: str | None) -> None:
        """The start waits for ``detail`` (free GPUs, a pending pod, Slurm's queue) until the next detail
        or the start's end (None): each wait an ``agent.wait`` span, so the time is seen, not a gap."""
        if self._waiting is not None:
            self._waiting.end()
            self._waiting = None
        if detail is not None:
            self._waiting = _tracer.start_span("agent.wait", attributes={"takeoff.detail": detail})

    async def _starting(self, detail: str) -> bool:
        """A runner's STARTING detail while its start waits: to the queue, and a wait span of its own."""
        self._report_waiting(detail)
        return await self._advance(ItemState.STARTING, detail)

    async def _advance(self, state: ItemState, detail: str) -> bool:
        """Report progress; False when the queue says the lease is lost (the attempt is then revoked)."""
        self.state, self.detail = state, detail
        if await self.reporter.progress(self, state, detail):
            return True
        self.request_stop(Stop.REVOKED)
        return False

    async def _build(self, kind: BuildKind) -> Built | Outcome:
        result = None
        sent_before = self.log.build_lines  # by this attempt before an agent restart
        async for event in self.context.builder.build(
            self.assignment.job_version.name,
            build_kind_to_proto(kind),
            self.assignment.run,
            push=self.runner.needs_pushed_image and kind is BuildKind.IMAGE,
            retry_until=self.assignment.start_deadline,  # an unreachable builder is waited for until then
        ):
            match event.WhichOneof("event"):
                case "log":
                    lines = list(event.log.lines)
                    skipped = min(sent_before, len(lines))
                    sent_before -= skipped
                    self.log.add(LogStream.BUILD, lines[skipped:])
                case "cache":
                    self.log.system(f"build {event.build}: {'cache hit' if event.cache.hit else 'building'}")
                case "result":
                    result = event.result
                case "failure":
                    failure = event.failure
                    self.log.system(f"build failed: {failure.message}")
                    return Outcome(
                        ItemState.FAILED,
                        failure_reason_from_proto(failure.reason, FailureReason.BUILD_FAILED),
                        message=failure_message(failure.message, failure.log_tail[-LAST_LINES_IN_MESSAGE:]),
                    )
        # The build's last lines go while the job starts: the start need not wait for their round trip.
        flushing = asyncio.create_task(self._flush_logs_quietly())
        self._background.add(flushing)
        flushing.add_done_callback(self._background.discard)
        if result is None:
            return Outcome(
                ItemState.FAILED, FailureReason.BUILD_INFRA, message="the build ended without a result"
            )
        return built_from_proto(result, kind)

    def _environment(self) -> dict[str, str]:
        """The job's environment as every runner gives it (docs/design.md §7): the resource config's
        ``env``, then what Takeoff tells the job, which the ``env`` cannot change."""
        assignment = self.assignment
        configured = assignment.resource_config.get("env") or {}
        return {
            **_tracing_environment(PASSED_TRACING_ENV),
            **{name: str(value) for name, value in configured.items()},
            "PYTHONUNBUFFERED": "1",
            "TAKEOFF_PROJECT": assignment.project,
            "TAKEOFF_RUN_ID": assignment.run_id,
            "TAKEOFF_JOB": assignment.job_version.label,
            "TAKEOFF_QUEUE": assignment.queue,
            "TAKEOFF_ITEM": assignment.item,
            "TAKEOFF_ATTEMPT": str(assignment.attempt),
            "TAKEOFF_CONFIG": json.dumps(assignment.run_config),
            "TRACEPARENT": self.job_traceparent,
        }

    async def _secrets(self) -> JobSecrets | Outcome:
        """What the job gets besides its environment: its run token as TAKEOFF_TOKEN, and the values of
        the secrets it was given, read with that token (docs/design.md §13). A secret that does not exist,
        or that the token may not read, fails the attempt CONFIG_INVALID, naming the secret; a registry
        that stays away fails it RUNNER_INFRA (retryable)."""
        secrets = JobSecrets()
        for mount in self.assignment.secrets:
            try:
                value = await self.context.runs.access_secret(mount.secret, token=self.token)
            except grpc.RpcError as error:
                return _secret_refused(mount, error)
            if mount.file:
                secrets.files[mount.file] = value
                continue
            try:
                text = value.decode()
                if "\0" in text:
                    raise ValueError("NUL")
            except ValueError:  # UnicodeDecodeError included
                return Outcome(
                    ItemState.FAILED,
                    FailureReason.CONFIG_INVALID,
                    message=f"the secret {mount.secret} cannot be the environment variable {mount.env}: "
                    "its value is not text without NUL characters (mount it as a file)",
                )
            secrets.env[mount.env] = text
        configured = self.assignment.resource_config.get("env") or {}
        for name, header in _tracing_environment(PASSED_TRACING_SECRETS).items():
            if name not in configured and name not in secrets.env:  # the launch's own choice wins
                secrets.env[name] = header
        if self.token:
            secrets.env["TAKEOFF_TOKEN"] = self.token  # last: no mount can replace it
        self.log.mask([*secrets.env.values(), *secrets.files.values()])
        return secrets

    async def _mask_secrets_again(self) -> None:
        """After an agent restart: the values of the job's secrets, to mask in its output again (the job
        has them already). Best effort: without them the output goes to the run as the job wrote it."""
        if not self.assignment.secrets:
            return
        try:
            values = [
                await self.context.runs.access_secret(mount.secret, token=self.token)
                for mount in self.assignment.secrets
            ]
        except grpc.RpcError as error:
            logger.warning(
                "could not read the secrets of %s again (%s): its output is not masked for them",
                self.assignment.run,
                status_code(error).name,
            )
            return
        self.log.mask(values)

    async def _start(self, built: Built, secrets: JobSecrets) -> Outcome | None:
        """Start the job; the outcome when its runner cannot."""
        launch = Launch(
            assignment=self.assignment,
            built=built,
            env=self._environment(),
            secrets=secrets.env,
            registry_address=self.context.job_registry_address,
            stop_grace_seconds=self.context.stop_grace_seconds,
            report=self._starting,
            secret_files=secrets.files,
            ca_file=self.context.job_ca_file,
        )
        try:
            await self.job.start(launch)
        except RunnerRefused as refused:
            return Outcome(ItemState.FAILED, FailureReason.CONFIG_INVALID, message=str(refused))
        except RunnerUnavailable as unavailable:
            return Outcome(
                ItemState.FAILED,
                FailureReason.RUNNER_INFRA,
                message=f"the {self.runner.kind.config_name} runner is unavailable: {unavailable}",
            )
        self.log.system(f"started {' '.join(self.assignment.entrypoint)}")
        return None

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
                if not ended.done():  # an ended job's last lines go with its outcome's, before the run ends
                    self.log.read_job_output()
                    await self._flush_logs_quietly()
            self.log.read_job_output(final=True)
            if stopping is not None:
                await stopping
            return ended.result()
        finally:
            stop_wanted.cancel()

    async def _failed_before_end(self, outcome: Outcome) -> Outcome:
        """An attempt that fails before its job could end by itself (refused, build failed, the runner or
        the agent failing): its job, if it got as far as starting, is stopped, and its run ends FAILED
        with the same message, so that run and attempt agree."""
        self.log.system(outcome.message)
        if self.job.started:
            with contextlib.suppress(Exception):
                await self.job.stop(self.context.stop_grace_seconds)
        await self._flush_logs_quietly()
        try:
            await self._run_created()
            await self.context.runs.finish(
                self.assignment.run,
                run_state_to_proto(RunState.FAILED),
                exit_code=outcome.exit_code,
                message=outcome.message,
                token=self.token,
            )
        except Exception:  # the run may not exist (the registry refused it): the outcome still goes out
            logger.warning("could not end the run of %s", self.assignment.run, exc_info=True)
        return outcome

    async def _end_stopped(self) -> Outcome | None:
        """A stop requested before the job was seen running: stop whatever the runner started, then the
        outcome of the stop (a cancel, a revoke, a timeout)."""
        await self.job.stop(self.context.stop_grace_seconds)
        self.log.read_job_output(final=True)
        return await self._conclude(self.job.exit())

    async def _finish_run(self, state: RunState, exit_code: int | None, message: str) -> RunState:
        """Set the run's final state, unless its job (the SDK) has set one; the final state either way.
        The log's lines go first, the outcome's with them: a follower of the log stops at the run's end."""
        await self._flush_logs_quietly()
        await self._run_created()  # a run never created fails here, as CreateRun did
        seen = self.context.run_ends.seen(self.assignment.run)
        if (
            seen is not None
            and seen.ended
            and (exit_code is None or seen.has_exit_code)
            and (not message or seen.has_message)
        ):
            # The job ended its run through the relay, and the registry keeps a run's first final state, exit
            # code and message: this FinishRun would change nothing, and answer the state seen.
            return RunState(seen.state)
        with _tracer.start_as_current_span("agent.finish_run") as span:
            final = await self.context.runs.finish(
                self.assignment.run,
                run_state_to_proto(state),
                exit_code=exit_code,
                message=message,
                token=self.token,
            )
            span.set_attribute("takeoff.run_state", RunState(final).name)
        return RunState(final)

    async def _conclude(self, ended: JobExit | None) -> Outcome | None:
        """The outcome of docs/design.md §7, and the run's final state when the job's SDK did not set one."""
        self._end_job_span(ended)
        exit_code = ended.exit_code if ended else None
        reason = (
            self.stop_reason
            if self.stop_reason is not None
            else (Stop.FENCED if ended and ended.fenced else None)
        )
        if reason is not None:
            self.log.system(f"job stopped: {reason.value}")
            final = await self._finish_run(RunState.KILLED, exit_code, reason.value)
            if reason is Stop.REVOKED:
                return None  # the queue has given the lease away: nothing to report
            if final is RunState.FINISHED:  # the job finished its run before the stop reached it
                return Outcome(
                    ItemState.SUCCEEDED,
                    exit_code=exit_code,
                    message=f"the job finished its run before it was stopped ({reason.value})",
                )
            if reason is Stop.CANCELLED:
                return Outcome(ItemState.CANCELLED, FailureReason.CANCELLED, exit_code, reason.value)
            failure = {
                # The fence stopped it (the agent's or the shim's): the queue may still hold the lease for
                # this agent, as it does across its own restart: it is told (LEASE_LOST if it gave it away).
                Stop.FENCED: FailureReason.AGENT_LOST,
                Stop.START_TIMEOUT: FailureReason.START_TIMEOUT,
                Stop.MAX_RUN_TIME: FailureReason.MAX_RUN_TIME_EXCEEDED,
                Stop.DRAINED: FailureReason.PREEMPTED,
            }[reason]
            return Outcome(ItemState.FAILED, failure, exit_code, reason.value)
        assert ended is not None
        if (
            ended.failure is not None
        ):  # the runner, not the job, decided the end (an image that will not pull)
            self.log.system(ended.failure.message)
            await self._finish_run(RunState.FAILED, exit_code, ended.failure.message)
            return Outcome(ItemState.FAILED, ended.failure.reason, exit_code, ended.failure.message)
        who = "job" if ended.rank is None else f"rank {ended.rank} of the job"
        self.log.system(
            f"{who} exited with code {ended.exit_code}" + (" (OOMKilled)" if ended.oom_killed else "")
        )
        if ended.exit_code != 0 or ended.oom_killed:
            crashed = ended.signal is not None or ended.oom_killed
            last_lines = list(self.log.last_lines)
            explanation = (
                "OOMKilled: the job ran out of memory" if ended.oom_killed else f"exit code {ended.exit_code}"
            )
            if ended.rank is not None:
                explanation = f"rank {ended.rank}: {explanation}"  # the others were stopped for it
            message = failure_message(explanation + ("; last lines:" if last_lines else ""), last_lines)
            await self._finish_run(RunState.CRASHED if crashed else RunState.FAILED, exit_code, message)
            return Outcome(ItemState.FAILED, FailureReason.JOB_FAILED, exit_code, message)
        seen = self.context.run_ends.seen(self.assignment.run)  # past STARTING: the job attached
        state = (
            seen.state
            if seen is not None
            else await self.context.runs.state(self.assignment.run, token=self.token)
        )
        if state == run_state_to_proto(RunState.STARTING):
            message = "the job exited 0 but never called takeoff.init(), so it reported no run (NO_RUN)"
            self.log.system(message)
            await self._finish_run(RunState.FAILED, 0, message)
            return Outcome(ItemState.FAILED, FailureReason.NO_RUN, 0, message)
        await self._finish_run(RunState.FINISHED, 0, "")
        return Outcome(ItemState.SUCCEEDED, exit_code=0)

    async def abandon(self) -> None:
        """Stop the job of a lease the queue gave away while the agent was away, and end its run KILLED
        (the next attempt has its own run)."""
        self.request_stop(Stop.REVOKED)
        stopping = asyncio.ensure_future(self.job.stop(self.context.stop_grace_seconds))
        # The run's and the log's calls below end by their deadlines (clients.py); a runner's stop has none.
        patience = self.context.stop_grace_seconds + SLOW_STOP_SECONDS
        while not (await asyncio.wait({stopping}, timeout=patience))[0]:
            logger.warning("the job of revoked lease %s is not stopped yet: still waiting", self.lease_id)
        await stopping
        await self._mask_secrets_again()
        self.log.read_job_output(final=True)
        try:
            await self._conclude(self.job.exit())
        except Exception:  # the run may never have been created; the queue has moved on either way
            logger.warning("could not end the run of revoked lease %s", self.lease_id, exc_info=True)
        await self._flush_logs_quietly()

    async def _flush_logs_quietly(self) -> None:
        try:
            await self._run_created()
            await self.log.flush()
        except Exception:  # logs must never cost the job its outcome; the next flush tries again
            logger.warning("could not send log lines of %s", self.assignment.run, exc_info=True)


def _tracing_environment(names: Sequence[str]) -> dict[str, str]:
    """The agent's own ``names`` variables that are set, when it exports spans (else none: the job's
    spans would go nowhere either)."""
    if not exporting():
        return {}
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def _secret_refused(mount: SecretMount, error: grpc.RpcError) -> Outcome:
    """The outcome of an attempt whose secret the registry would not give (naming it, never a value)."""
    code = status_code(error)
    if code is grpc.StatusCode.NOT_FOUND:
        reason, why = FailureReason.CONFIG_INVALID, "it does not exist"
    elif code is grpc.StatusCode.PERMISSION_DENIED:
        reason, why = FailureReason.CONFIG_INVALID, "this attempt may not read it (not in its run token)"
    else:
        status = decode_rpc_error(error)
        reason, why = FailureReason.RUNNER_INFRA, f"the registry did not give it ({status.reason})"
    message = f"the secret {mount.secret} (as {mount.target}) cannot be given to the job: {why}"
    return Outcome(ItemState.FAILED, reason, message=message)


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
