"""Runs: one tracked attempt of a job, with its config, metric history, summary, logs and state.

Metric rows and log lines arrive in batches that the api layer has already encoded; a run stores each
accepted batch as one chunk and keeps the totals (history length, last step, metric keys, line count) on
the run itself. Followers of a run are woken in-process when it changes, with a slow poll besides for
changes made by another registry sharing a PostgreSQL database.

Each run may append at most so many log lines and metric rows per second (token buckets per run, counted
by each registry process for itself): a batch beyond its run's rate is refused whole, before anything of
it is stored, with RESOURCE_EXHAUSTED ``RATE_LIMITED`` saying when to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import string
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from takeoff_registry.jobs import Jobs
from takeoff_registry.refs import JobReference, RunKey, project_not_found
from takeoff_registry.sampling import MAX_MAX_POINTS, MIN_MAX_POINTS, Column, Sampler, decode_columns
from takeoff_registry.store import (
    LogChunkRow,
    MetricChunkRow,
    RegistryStore,
    RunRow,
    Tx,
    tags_of,
    tags_text,
)
from takeoff_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
)
from takeoff_server.idempotency import request_fingerprint
from takeoff_server.pagination import PageRequest
from takeoff_server.rate_limits import Rate, RateLimiter
from takeoff_server.validation import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    Problems,
    check_struct,
    check_text,
    field_error,
    text_problem,
)

MAX_BATCH = 10_000
MAX_DISPLAY_NAME = 256
MAX_MESSAGE_BYTES = 64 * 1024
MAX_SUMMARY_BYTES = MAX_CONFIG_BYTES
MAX_METRIC_KEYS = 1000
"""Distinct metric keys a run may log: every Run message lists them all."""
MAX_METRIC_KEY = 256
"""Characters in one metric key."""
MAX_TAGS = 64
MAX_TAG = 64
MAX_NOTES = 4096
MAX_GROUP = 128
MAX_JOB_TYPE = 64
FOLLOW_POLL_SECONDS = 1.0
LOG_LINE_RATE = Rate(per_second=10_000, burst=50_000)
"""Log lines one run may append per second, per registry process: far above what a job prints (the agent
sends a chatty job's output in batches), low enough that one runaway job cannot fill the database."""
METRIC_ROW_RATE = Rate(per_second=10_000, burst=500_000)
"""Metric rows one run may log per second, per registry process. The burst is large because a tight
``run.log`` loop is normal: the SDK delivers 100,000 rows logged in a fraction of a second at well over
100,000 rows/s (bench/sdk_log.py), and bench/registry_ingest.py stores 200,000 rows on one run at up to
300,000 rows/s; both stay within it. What it stops is a job that keeps that pace for minutes."""
CHUNKS_PER_READ = 16
COLUMN_CHUNKS_PER_READ = 256
"""Chunks whose columns one read transaction of ReadMetrics ``max_points`` takes: their columns only,
about 10 bytes a value."""
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
_RUN_ID_LENGTH = 12


class RunState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    KILLED = "KILLED"

    @property
    def ended(self) -> bool:
        return self not in (RunState.STARTING, RunState.RUNNING)


@dataclass(frozen=True, slots=True)
class Run:
    key: RunKey
    display_name: str
    job_version: str
    queue_item: str
    attempt: int
    state: RunState
    config: dict[str, Any]
    summary: dict[str, Any]
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    update_time: datetime
    exit_code: int | None
    message: str
    history_length: int
    last_step: int
    metric_keys: tuple[str, ...]
    log_line_count: int
    labels: RunLabels
    launch_config_keys: tuple[str, ...]
    resumed_from: str
    """The run of the item's previous attempt this one continues (``projects/P/runs/R``), or empty."""


class ResumeMode(StrEnum):
    """Whether AttachRun hands the job the run it continues (``takeoff.init(resume=...)``)."""

    NEVER = "NEVER"
    ALLOW = "ALLOW"
    MUST = "MUST"


@dataclass(frozen=True, slots=True)
class Attached:
    run: Run
    resumed_from_run: Run | None
    """The run it continues, as it is now, when the job asked to resume and there is one."""


@dataclass(frozen=True, slots=True)
class RunLabels:
    """What a user says to find and describe a run by (``takeoff.init(tags=..., notes=..., ...)``)."""

    tags: tuple[str, ...] = ()
    notes: str = ""
    group: str = ""
    job_type: str = ""


@dataclass(frozen=True, slots=True)
class NewRun:
    """What the creator of a run says about it."""

    display_name: str = ""
    job_version: JobReference | None = None
    queue_item: str = ""
    attempt: int = 0
    config: dict[str, Any] | None = None
    """The launch config when the agent creates the run: its keys stay read-only (UpdateRunConfig)."""
    labels: RunLabels = RunLabels()


@dataclass(frozen=True, slots=True)
class RunFilter:
    job: str = ""
    """A job name: runs of any of its versions."""
    job_version: str = ""
    queue_item: str = ""
    states: tuple[RunState, ...] | None = None
    """None: every state; empty: none."""
    id_prefix: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    """Runs carrying every one of them."""


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Metric rows or log lines in the encoding the api layer chose, with what the run record needs."""

    count: int
    encode: Callable[[int], bytes]
    """The entries from the given offset on, encoded (the offset skips entries stored before)."""
    max_step: int = 0
    keys: frozenset[str] = frozenset()
    encode_columns: Callable[[int], bytes] | None = None
    """Metric rows' columns for sampling (takeoff_registry.sampling), from the given offset on."""


@dataclass(frozen=True, slots=True)
class Appended:
    accepted: int
    skipped: int
    length: int
    """Entries the run holds after the call."""


@dataclass(frozen=True, slots=True)
class SampledHistory:
    """The rows ReadMetrics sends for ``max_points``."""

    end: int
    """The history sampled ends before this index: its length when the read began."""
    indices: list[int]
    """The rows chosen, in order."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Stored entries ``first_index .. first_index + count - 1`` in their encoding."""

    first_index: int
    count: int
    payload: bytes
    store_time: datetime


class History(StrEnum):
    """The two append-only sequences of a run."""

    METRICS = "metrics"
    LOGS = "logs"


class RunSignals:
    """Wakes the readers that follow a run when it changes."""

    def __init__(self) -> None:
        # Events nobody waits for any more vanish with their last waiter.
        self._events: weakref.WeakValueDictionary[RunKey, asyncio.Event] = weakref.WeakValueDictionary()

    def listen(self, key: RunKey) -> asyncio.Event:
        """An event set at the run's next change. Take it before reading, so no change slips between."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def notify(self, key: RunKey) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()


def _now() -> datetime:
    return datetime.now(UTC)


def _new_run_id() -> str:
    return "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(_RUN_ID_LENGTH))


def _run_not_found(key: RunKey) -> NotFound:
    return NotFound("RUN_NOT_FOUND", f"run {key.name} does not exist", metadata={"resource": key.name})


def _run_ended(state: str, key: RunKey, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        "RUN_ENDED",
        f"run {key.name} has ended ({state}) and accepts no more {what}",
        metadata={"resource": key.name, "state": state},
    )


def _config_keys_read_only(key: RunKey, names: list[str]) -> FailedPrecondition:
    quoted = ", ".join(repr(name) for name in names)
    return FailedPrecondition(
        "CONFIG_KEY_READ_ONLY",
        f"config keys set by the launch of run {key.name} are read-only: {quoted}",
        metadata={"resource": key.name},
        violations=[FieldViolation(f"config.{name}", "set by the launch; read-only") for name in names],
    )


def checked_labels(labels: RunLabels, *, field_prefix: str = "") -> RunLabels:
    """``labels`` with repeated tags dropped (the first of each kept), or INVALID_ARGUMENT
    ``ARGUMENT_INVALID`` naming every field out of bounds (``{field_prefix}tags[3]``...)."""
    problems = Problems()
    for index, tag in enumerate(labels.tags):
        if problem := _tag_problem(tag):
            problems.add("ARGUMENT_INVALID", f"{field_prefix}tags[{index}]", problem)
    tags = tuple(dict.fromkeys(labels.tags))
    if len(tags) > MAX_TAGS:
        problems.add("ARGUMENT_INVALID", f"{field_prefix}tags", f"at most {MAX_TAGS} tags (got {len(tags)})")
    for field, value, max_chars in (
        ("notes", labels.notes, MAX_NOTES),
        ("group", labels.group, MAX_GROUP),
        ("job_type", labels.job_type, MAX_JOB_TYPE),
    ):
        if problem := text_problem(value, max_chars=max_chars):
            problems.add("ARGUMENT_INVALID", f"{field_prefix}{field}", problem)
    problems.raise_if_any()
    return RunLabels(tags, labels.notes, labels.group, labels.job_type)


def _tag_problem(tag: str) -> str | None:
    if not tag:
        return f"must be 1 to {MAX_TAG} characters"
    if "," in tag:
        return "must not contain a comma (lists of tags are written comma-separated)"
    return text_problem(tag, max_chars=MAX_TAG)


def _merged(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each top-level key of ``changes`` replaced, or removed where it is None."""
    merged = dict(values)
    for name, value in changes.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def _check_batch_size(count: int, field: str) -> None:
    if not 1 <= count <= MAX_BATCH:
        raise field_error(field, f"a batch holds 1 to {MAX_BATCH} entries (got {count})")


def _take(limiter: RateLimiter, key: RunKey, count: int) -> None:
    """Count a batch against the run's rate before anything of it is stored: a refused batch stores
    nothing (RESOURCE_EXHAUSTED ``RATE_LIMITED``, with ``retry_after_seconds``)."""
    try:
        limiter.take(key.name, count)
    except ResourceExhausted as error:
        error.metadata["resource"] = key.name
        raise


def _skipped(stored: int, first_index: int | None, field: str) -> int:
    """How many leading entries of a batch are stored already; raises on a gap."""
    if first_index is None:
        return 0
    if first_index < 0:
        raise field_error(field, "must not be negative")
    if first_index > stored:
        raise FailedPrecondition(
            "SEQUENCE_GAP",
            f"{field} is {first_index} but only {stored} entries are stored; resend from {stored}",
            metadata={"length": str(stored)},
        )
    return stored - first_index


class Runs:
    """Creates runs, records what they report and streams it back."""

    def __init__(
        self,
        store: RegistryStore,
        jobs: Jobs,
        *,
        poll_seconds: float = FOLLOW_POLL_SECONDS,
        log_line_rate: Rate = LOG_LINE_RATE,
        metric_row_rate: Rate = METRIC_ROW_RATE,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._signals = RunSignals()
        self._poll_seconds = poll_seconds
        self._log_lines = RateLimiter(log_line_rate, "log lines per run")
        self._metric_rows = RateLimiter(metric_row_rate, "metric rows per run")

    async def create_run(self, project: str, run_id: str, new: NewRun, *, request_id: str) -> Run:
        """Create a STARTING run; an empty ``run_id`` gets a generated one."""
        check_text(new.display_name, field="run.display_name", max_chars=MAX_DISPLAY_NAME)
        if new.attempt < 0:
            raise field_error("run.attempt", "must not be negative")
        if new.config is not None:
            _check_struct(new.config, "run.config", MAX_CONFIG_BYTES)
        labels = checked_labels(new.labels, field_prefix="run.")
        fingerprint = request_fingerprint(
            {
                "project": project,
                "run_id": run_id,
                "display_name": new.display_name,
                "job_version": str(new.job_version or ""),
                "queue_item": new.queue_item,
                "attempt": new.attempt,
                "config": new.config,
                # Only when given, so that a retry of a request recorded before labels existed matches.
                **({"labels": dataclasses.asdict(labels)} if labels != RunLabels() else {}),
            }
        )
        # One transaction: the replay and the job version are read in it rather than each in a read
        # transaction of its own before it (two fewer per run; the version is cached after its first read).
        async with self._store.write() as tx:
            if request_id and (replayed := await tx.replay("CreateRun", request_id, fingerprint)):
                return await self._require_run(tx, RunKey.parse(replayed, field="request_id"))
            version = await self._jobs.resolve_in(tx, new.job_version) if new.job_version else None
            now = _now()
            await tx.ensure_project(project, now)
            key = RunKey(project, run_id or _new_run_id())
            previous = (
                await tx.previous_attempt(project, new.queue_item, new.attempt)
                if new.queue_item and new.attempt > 1
                else None
            )
            row = RunRow(
                project_id=project,
                run_id=key.run,
                display_name=new.display_name,
                job=version.job.name if version else "",
                job_version=version.name if version else "",
                queue_item=new.queue_item,
                attempt=new.attempt,
                state=RunState.STARTING,
                config=new.config or {},
                summary={},
                create_time=now,
                update_time=now,
                message="",
                history_length=0,
                last_step=0,
                metric_keys=[],
                log_line_count=0,
                tags=tags_text(labels.tags),
                notes=labels.notes,
                run_group=labels.group,
                job_type=labels.job_type,
                launch_config_keys=list(new.config or ()),
                resumed_from=RunKey(previous.project_id, previous.run_id).name if previous else "",
            )
            if not await tx.insert_run(row):
                raise AlreadyExists(
                    "RUN_ALREADY_EXISTS", f"run {key.name} already exists", metadata={"resource": key.name}
                )
            if request_id:
                await tx.remember("CreateRun", request_id, fingerprint, key.name)
            return _run(row)

    async def attach_run(
        self,
        key: RunKey,
        *,
        config: dict[str, Any] | None,
        display_name: str,
        labels: RunLabels,
        resume: ResumeMode = ResumeMode.NEVER,
    ) -> Attached:
        """STARTING -> RUNNING, once; records the config the job really uses (the launch's keys stay
        read-only) and the labels it gives, keeping those it leaves empty. With ``resume`` ALLOW or MUST,
        also the run it continues; MUST without one changes nothing (NOTHING_TO_RESUME)."""
        check_text(display_name, field="display_name", max_chars=MAX_DISPLAY_NAME)
        if config is not None:
            _check_struct(config, "config", MAX_CONFIG_BYTES)
        labels = checked_labels(labels)
        async with self._store.write() as tx:
            row = await self._require_run_row(tx, key, for_update=True)
            if row.state == RunState.RUNNING:
                raise FailedPrecondition(
                    "RUN_ALREADY_ATTACHED",
                    f"run {key.name} is already attached; a run is attached once",
                    metadata={"resource": key.name},
                )
            if RunState(row.state).ended:
                raise _run_ended(row.state, key, "attach")
            resumed = None
            if resume is not ResumeMode.NEVER and row.resumed_from:
                previous = RunKey.parse(row.resumed_from, field="resumed_from")
                resumed = await tx.run(previous.project, previous.run)
            if resume is ResumeMode.MUST and resumed is None:
                raise FailedPrecondition(
                    "NOTHING_TO_RESUME",
                    f"run {key.name} continues no earlier run (it is not a retried attempt of a queue item), "
                    "so it cannot resume",
                    metadata={"resource": key.name},
                )
            now = _now()
            row.state = RunState.RUNNING
            row.start_time = row.update_time = now
            if config is not None:
                row.config = config
            if display_name:
                row.display_name = display_name
            if labels.tags:
                row.tags = tags_text(labels.tags)
            row.notes = labels.notes or row.notes
            row.run_group = labels.group or row.run_group
            row.job_type = labels.job_type or row.job_type
            return Attached(_run(row), _run(resumed) if resumed is not None else None)

    async def get_run(self, key: RunKey) -> Run:
        async with self._store.read() as tx:
            return await self._require_run(tx, key)

    async def list_runs(
        self, project: str, where: RunFilter, *, page: PageRequest
    ) -> tuple[list[tuple[Run, int]], bool]:
        """One page of runs, newest first, each with its list position (the cursor after it), and whether
        more runs follow."""
        # Filter values follow the rules of what they match: a tag with a comma could match two tags.
        checked_labels(RunLabels(tags=where.tags, group=where.group))
        async with self._store.read() as tx:
            if not await tx.project_exists(project):
                raise project_not_found(project)
            rows = await tx.runs(
                project,
                job=where.job,
                job_version=where.job_version,
                queue_item=where.queue_item,
                states=None if where.states is None else [str(state) for state in where.states],
                id_prefix=where.id_prefix,
                group=where.group,
                tags=where.tags,
                before_seq=int(page.after[0]) if page.after else None,
                limit=page.size + 1,
            )
        return [(_run(row), _seq(row)) for row in rows[: page.size]], len(rows) > page.size

    async def log_metrics(self, key: RunKey, batch: EncodedBatch, *, first_index: int | None) -> Appended:
        """Append metric rows to a STARTING or RUNNING run, skipping rows it has already."""
        _check_batch_size(batch.count, "rows")
        _take(self._metric_rows, key, batch.count)
        async with self._store.write() as tx:
            position = await tx.history_position(key.project, key.run)
            if position is None:
                raise _run_not_found(key)
            if RunState(position.state).ended:
                raise _run_ended(position.state, key, "metrics")
            skipped = _skipped(position.length, first_index, "first_row_index")
            accepted = max(0, batch.count - skipped)
            if accepted:
                keys = position.metric_keys
                if not batch.keys.issubset(keys):
                    keys = sorted(batch.keys.union(keys))
                    if len(keys) > MAX_METRIC_KEYS:
                        raise field_error(
                            "rows",
                            f"a run holds at most {MAX_METRIC_KEYS} distinct metric keys ({len(keys)})",
                        )
                chunk = MetricChunkRow(
                    run_seq=position.seq,
                    first_index=position.length,
                    count=accepted,
                    payload=batch.encode(batch.count - accepted),
                    value_columns=batch.encode_columns(batch.count - accepted)
                    if batch.encode_columns
                    else None,
                    store_time=_now(),
                )
                last_step = max(position.last_step, batch.max_step) if position.length else batch.max_step
                await tx.append_metric_chunk(position, chunk, last_step=last_step, metric_keys=keys)
            length = position.length + accepted
        if accepted:
            self._signals.notify(key)
        return Appended(accepted, batch.count - accepted, length)

    async def append_logs(self, key: RunKey, batch: EncodedBatch, *, first_index: int | None) -> Appended:
        """Append log lines to a run in any state, skipping lines it has already."""
        _check_batch_size(batch.count, "lines")
        _take(self._log_lines, key, batch.count)
        async with self._store.write() as tx:
            position = await tx.log_position(key.project, key.run)
            if position is None:
                raise _run_not_found(key)
            run_seq, length = position
            skipped = _skipped(length, first_index, "first_line_index")
            accepted = max(0, batch.count - skipped)
            if accepted:
                await tx.append_log_chunk(
                    run_seq, length, accepted, batch.encode(batch.count - accepted), _now()
                )
                length += accepted
        if accepted:
            self._signals.notify(key)
        return Appended(accepted, batch.count - accepted, length)

    async def update_summary(self, key: RunKey, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge top-level keys into the summary (None deletes a key); returns the whole summary."""
        _check_struct(changes, "summary", MAX_SUMMARY_BYTES)
        async with self._store.write() as tx:
            row = await self._require_run_row(tx, key, for_update=True, project_hint=False)
            if RunState(row.state).ended:
                raise _run_ended(row.state, key, "summary updates")
            summary = _merged(row.summary, changes)
            _check_struct(summary, "summary", MAX_SUMMARY_BYTES)
            row.summary = summary
            row.update_time = _now()
            return summary

    async def update_config(self, key: RunKey, changes: dict[str, Any]) -> Run:
        """Merge top-level keys into the config (None removes a key). A change that touches a key the
        launch set is refused whole, naming each such key."""
        _check_struct(changes, "config", MAX_CONFIG_BYTES)
        async with self._store.write() as tx:
            row = await self._require_run_row(tx, key, for_update=True, project_hint=False)
            if RunState(row.state).ended:
                raise _run_ended(row.state, key, "config updates")
            if read_only := [name for name in changes if name in row.launch_config_keys]:
                raise _config_keys_read_only(key, read_only)
            config = _merged(row.config, changes)
            _check_struct(config, "config", MAX_CONFIG_BYTES)
            row.config = config
            row.update_time = _now()
            return _run(row)

    async def finish_run(
        self, key: RunKey, state: RunState, *, exit_code: int | None, message: str
    ) -> tuple[Run, bool]:
        """Set the final state unless the run has one already (the first wins); returns the run and
        whether it had ended before."""
        if not state.ended:
            raise field_error("state", "must be a final state: FINISHED, FAILED, CRASHED or KILLED")
        check_text(message, field="message", max_bytes=MAX_MESSAGE_BYTES)
        async with self._store.write() as tx:
            row = await self._require_run_row(tx, key, for_update=True, project_hint=False)
            already_ended = RunState(row.state).ended
            now = _now()
            if not already_ended:
                row.state = state
                row.end_time = now
                row.message = message
            elif message and not row.message:
                row.message = message
            if exit_code is not None and row.exit_code is None:
                row.exit_code = exit_code
            row.update_time = now
            run = _run(row)
        self._signals.notify(key)
        return run, already_ended

    async def read(
        self, key: RunKey, history: History, *, start: int, follow: bool, end: int | None = None
    ) -> AsyncIterator[Chunk]:
        """The stored chunks holding entries from ``start`` on (before ``end``, if given), in order (the
        first may begin earlier).

        With ``follow``, waits for more until the run has ended and everything stored before the end has
        been read.
        """
        _check_start(start)
        position = start
        while True:
            changed = self._signals.listen(key)
            async with self._store.read() as tx:
                row = await self._require_run_row(tx, key)
                length = row.history_length if history is History.METRICS else row.log_line_count
                if end is not None:
                    length = min(length, end)
                ended = RunState(row.state).ended
                chunks: Sequence[MetricChunkRow] | Sequence[LogChunkRow] = ()
                if position < length and history is History.METRICS:
                    chunks = await tx.chunks(
                        MetricChunkRow, _seq(row), start=position, end=length, limit=CHUNKS_PER_READ
                    )
                elif position < length:
                    chunks = await tx.chunks(
                        LogChunkRow, _seq(row), start=position, end=length, limit=CHUNKS_PER_READ
                    )
            for chunk in chunks:
                yield Chunk(chunk.first_index, chunk.count, chunk.payload, chunk.store_time)
                position = chunk.first_index + chunk.count
            if position < length:
                continue
            if not follow or ended:
                return
            # The timeout catches changes made by another registry sharing the database.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=self._poll_seconds)

    async def sample_metrics(
        self,
        key: RunKey,
        *,
        start: int,
        max_points: int,
        keys: frozenset[str],
        columns_of: Callable[[bytes], dict[str, Column]],
    ) -> SampledHistory | None:
        """The rows to send of the history from ``start`` downsampled to about ``max_points`` per key
        (takeoff_registry.sampling), or None when it holds no more rows than that. Reads the chunks'
        columns, not their rows; ``columns_of`` makes them from the payload of a chunk stored without."""
        _check_start(start)
        if max_points < 0 or 0 < max_points < MIN_MAX_POINTS or max_points > MAX_MAX_POINTS:
            raise field_error(
                "max_points",
                f"must be 0 (every row) or {MIN_MAX_POINTS} to {MAX_MAX_POINTS:,} (got {max_points})",
            )
        async with self._store.read() as tx:
            row = await self._require_run_row(tx, key)
        end = row.history_length
        if not max_points or end - start <= max_points:
            return None
        sampler = Sampler(start=start, end=end, max_points=max_points, keys=keys)
        position = start
        while position < end:
            async with self._store.read() as tx:
                stored = await tx.metric_columns(
                    _seq(row), start=position, end=end, limit=COLUMN_CHUNKS_PER_READ
                )
            if not stored:
                break
            for chunk in stored:
                columns = (
                    decode_columns(chunk.value_columns)
                    if chunk.value_columns is not None
                    else columns_of(chunk.payload or b"")
                )
                if chunk.first_index < start:
                    columns = {
                        name: column.from_row(start - chunk.first_index) for name, column in columns.items()
                    }
                sampler.add(max(start, chunk.first_index), columns)
                position = chunk.first_index + chunk.count
        return SampledHistory(end, sampler.indices())

    async def _require_run_row(
        self, tx: Tx, key: RunKey, *, for_update: bool = False, project_hint: bool = True
    ) -> RunRow:
        """The run's row; a missing run is RUN_NOT_FOUND, or PROJECT_NOT_FOUND for reads
        (``project_hint``) in a project never written to."""
        row = await tx.run(key.project, key.run, for_update=for_update)
        if row is not None:
            return row
        if project_hint and not await tx.project_exists(key.project):
            raise project_not_found(key.project)
        raise _run_not_found(key)

    async def _require_run(self, tx: Tx, key: RunKey) -> Run:
        return _run(await self._require_run_row(tx, key))


def _check_start(start: int) -> None:
    if start < 0:
        raise field_error("start_index", "must not be negative")


def _check_struct(value: dict[str, Any], field: str, max_bytes: int) -> None:
    check_struct(value, field=field, max_bytes=max_bytes, max_depth=MAX_CONFIG_DEPTH)


def _seq(row: RunRow) -> int:
    assert row.seq is not None, "a stored run has a sequence number"
    return row.seq


def _run(row: RunRow) -> Run:
    return Run(
        key=RunKey(row.project_id, row.run_id),
        display_name=row.display_name,
        job_version=row.job_version,
        queue_item=row.queue_item,
        attempt=row.attempt,
        state=RunState(row.state),
        config=row.config,
        summary=row.summary,
        create_time=row.create_time,
        start_time=row.start_time,
        end_time=row.end_time,
        update_time=row.update_time,
        exit_code=row.exit_code,
        message=row.message,
        history_length=row.history_length,
        last_step=row.last_step,
        metric_keys=tuple(row.metric_keys),
        log_line_count=row.log_line_count,
        labels=RunLabels(tags_of(row.tags), row.notes, row.run_group, row.job_type),
        launch_config_keys=tuple(row.launch_config_keys),
        resumed_from=row.resumed_from,
    )
