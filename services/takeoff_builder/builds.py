"""Builds as they happen: one task per build, joined by identical requests, followed by any number of
callers, recorded in the store when they start, run and end.

A build is identified by what it would produce (kind, build key, options): a request for a build that
is already under way joins it instead of starting another, so two simultaneous identical builds run
once. Cache hits are answered at once; anything that has to be built waits for one of a fixed number
of slots. A build outlives the call that started it: a caller that goes away does not stop it.

A cache hit (venv, or image not pushed) is answered from the cache itself, before anything is written
(``HitRecords``): its record is stored after the answer, with the other hits of that moment in one
transaction.

Replicas sharing a PostgreSQL database carry single flight across processes: a flight is carried out by the
replica holding its lock, followed by the others from the database, and carried on by one of them when its
holder dies or stops (``flights``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import trace

from takeoff_builder.flights import Changes, FlightLock, Flights, SharedLocks
from takeoff_builder.images import BUILD_KEY_LABEL, Images
from takeoff_builder.keys import BuildKeys, build_keys
from takeoff_builder.locks import KeyedLocks, Locks
from takeoff_builder.metrics import BuilderMetrics
from takeoff_builder.model import (
    LOG_TAIL_LINES,
    Build,
    BuildError,
    BuildEvent,
    BuildFailed,
    BuildFailure,
    BuildKind,
    BuildQuery,
    BuildRequest,
    BuildResult,
    BuildState,
    CacheChecked,
    EventBody,
    Failed,
    FailureReason,
    ImageSource,
    JobSpec,
    LogLine,
    Succeeded,
)
from takeoff_builder.registry_client import RegistryClient
from takeoff_builder.sources import CodeCache
from takeoff_builder.store import BUILD_SCOPE, BuildStore
from takeoff_builder.venvs import Venvs, venv_python
from takeoff_server.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from takeoff_server.idempotency import request_fingerprint
from takeoff_server.pagination import PageRequest

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Clock = Callable[[], datetime]
FlightKey = tuple[BuildKind, str, bool, bool]
"""kind, build key (the image reference for noop), push, no_cache: builds that would do the same."""


_CARRIED_ON = "the builder that carried this build out stopped: carrying it on here"
_STOPPED = "the builder stopped before the build finished"
_RECORD_RETRY_SECONDS = (0.1, 5.0)
"""The first and the longest wait before a hit's record is written again after the database failed."""
_RECORD_AT_STOP_SECONDS = 5.0
"""How long a stopping builder waits for the records of the hits it answered."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Redactor:
    """Blanks configured secrets out of text before anyone can see or store it, and replaces NUL
    characters, which a tool's output may hold and PostgreSQL's text cannot, with U+FFFD."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.replace("\x00", "\ufffd")


class BuildRun:
    """One build's record and events, in order, as they happen; callers follow them from the start."""

    def __init__(self, build: Build, *, redact: Redactor, clock: Clock) -> None:
        self.build = build
        self.events: list[BuildEvent] = []
        self.log_lines: list[str] = []
        self.done = False
        self.holds: frozenset[str] = frozenset()
        """The cache entries this build uses or makes (see ``Builder.held``)."""
        self.carried_here = True
        """False while another replica carries the build out and this one follows it from the database."""
        self.changed = asyncio.Event()
        """Set at every event and change of state, for ``progress``."""
        self.progress: _Progress | None = None
        """Stores the build's state and log as they change, where other replicas may follow it."""
        self._redact = redact
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @classmethod
    def replay(cls, build: Build, log_lines: list[str], *, redact: Redactor, clock: Clock) -> BuildRun:
        """A finished build read back from the store, with the events it had."""
        run = cls(build, redact=redact, clock=clock)
        moment = build.end_time or build.create_time
        if build.cache_detail is not None:
            run.events.append(
                BuildEvent(
                    moment,
                    CacheChecked(build.cache_hit, build.environment_key, build.build_key, build.cache_detail),
                )
            )
        run.log_lines = log_lines
        run.events += [BuildEvent(moment, LogLine(line)) for line in log_lines]
        if build.result is not None:
            run.events.append(BuildEvent(moment, Succeeded(build.result)))
        elif build.failure is not None:
            run.events.append(BuildEvent(moment, Failed(build.failure)))
        run.done = True
        return run

    def snapshot(self) -> Build:
        return dataclasses.replace(self.build)

    def log(self, text: str) -> None:
        """Add output to the log; callable from any thread."""
        if threading.get_ident() == self._loop_thread:
            self._add_log(text)
        else:
            self._loop.call_soon_threadsafe(self._add_log, text)

    def _add_log(self, text: str) -> None:
        for raw_line in text.splitlines() or [""]:
            line = self._redact(raw_line)
            self.log_lines.append(line)
            self.build.log_line_count += 1
            self._emit(LogLine(line))

    def cache_checked(self, hit: bool, detail: str) -> None:
        told = self.build.cache_detail is not None
        self.build.cache_hit = hit
        self.build.cache_detail = detail
        if told:  # a build taken over from a replica that died: its stream told of the first look-up
            self._add_log(f"cache: {detail}")
        else:
            self._emit(CacheChecked(hit, self.build.environment_key, self.build.build_key, detail))

    def catch_up(self, stored: Build, lines: list[str]) -> None:
        """Take in what the replica carrying the build out has stored since: its new log lines (numbered
        from ``len(self.log_lines)``), its cache look-up and its state; its end, when it has ended."""
        if stored.cache_detail is not None and self.build.cache_detail is None:
            self.cache_checked(stored.cache_hit, stored.cache_detail)
        for line in lines:
            self._add_log(line)
        build = self.build
        build.state, build.start_time = stored.state, stored.start_time
        if stored.state.is_terminal:
            build.result, build.failure, build.end_time = stored.result, stored.failure, stored.end_time

    def end(self, outcome: BuildResult | BuildFailure) -> None:
        """Set the final state; ``publish_end`` tells the followers once it is stored."""
        build = self.build
        build.end_time = self._clock()
        build.start_time = build.start_time or build.end_time
        if isinstance(outcome, BuildResult):
            build.state, build.result = BuildState.SUCCEEDED, outcome
        else:
            build.state, build.failure = BuildState.FAILED, outcome

    def publish_end(self) -> None:
        build = self.build
        self._emit(Succeeded(build.result) if build.result is not None else Failed(build.failure))  # type: ignore[arg-type]
        self.done = True

    def failure(self, reason: FailureReason, message: str) -> BuildFailure:
        return BuildFailure(reason, self._redact(message), tuple(self.log_lines[-LOG_TAIL_LINES:]))

    def _emit(self, body: EventBody) -> None:
        self.events.append(BuildEvent(self._clock(), body))
        self.changed.set()
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def follow(self) -> AsyncIterator[list[BuildEvent]]:
        """Every event from the first, in batches of what is new, until the build has ended."""
        seen = 0
        while True:
            wakeup = self._wakeup
            if seen < len(self.events):
                batch = self.events[seen:]
                seen += len(batch)
                yield batch
                continue
            if self.done:
                return
            await wakeup.wait()


class _Progress:
    """Stores a build's state and new log lines whenever they change, each batch with a notification, so
    that replicas following the build from the database see it as it happens. Whatever changes while one
    batch is written goes into the next."""

    def __init__(self, store: BuildStore, run: BuildRun) -> None:
        self._store = store
        self._run = run
        self._stored = len(run.log_lines)
        self._closing = False
        self._task = asyncio.create_task(self._store_changes())

    async def _store_changes(self) -> None:
        while True:
            await self._run.changed.wait()
            self._run.changed.clear()
            if self._closing:
                return
            try:
                await self._write()
            except Exception:  # the next change, or the end, writes it again
                logger.exception("could not store the progress of %s", self._run.build.name)

    async def _write(self) -> None:
        lines = self._run.log_lines[self._stored :]
        await self._store.update(self._run.build, log_lines=lines, first_line=self._stored, notify=True)
        self._stored += len(lines)

    async def close(self) -> None:
        """Store what is left (the end, once the build has ended) after the batch being written."""
        self._closing = True
        self._run.changed.set()
        await self._task
        await self._write()


@dataclass(eq=False)
class _Hit:
    """A cache hit from its look-up until its record is stored."""

    run: BuildRun
    request_id: str = ""
    fingerprint: str = ""
    write: asyncio.Task[None] | None = None
    """Stores the record, trying again while the database fails; None while the cache is looked up."""
    tried: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first try to store the record has ended, stored or not."""


class HitRecords:
    """Cache hits answered before their records are stored.

    A hit is here from before its cache look-up (what it holds counts as in use for retention) until its
    record is committed, which happens after the answer, in a transaction shared with the other hits of
    that moment. Until then it answers GetBuild and a retry of its request id. A write that fails is tried
    again (the answer stands: faults cost time); a builder that stops waits a moment for them."""

    def __init__(self, store: BuildStore) -> None:
        self._store = store
        self._hits: dict[str, _Hit] = {}
        self._asked: dict[str, _Hit] = {}

    def hold(self, run: BuildRun) -> None:
        """Count what ``run`` holds as in use from now on, before its cache look-up."""
        self._hits[run.build.id] = _Hit(run)

    def let_go(self, run: BuildRun) -> None:
        """The look-up missed: ``run`` is not a hit."""
        del self._hits[run.build.id]

    def record(self, run: BuildRun, request_id: str, fingerprint: str) -> None:
        """Store the ended ``run`` (held before) in the background."""
        hit = self._hits[run.build.id]
        hit.request_id, hit.fingerprint = request_id, fingerprint
        if request_id:
            self._asked[request_id] = hit
        hit.write = asyncio.create_task(self._write(hit), name=f"record {run.build.id}")

    async def _write(self, hit: _Hit) -> None:
        build = hit.run.build
        delay, longest = _RECORD_RETRY_SECONDS
        try:
            while True:
                try:
                    await self._store.insert_ended(
                        build, request_id=hit.request_id, fingerprint=hit.fingerprint, holds=hit.run.holds
                    )
                    return
                except Exception:
                    logger.exception("could not store %s; trying again in %.1f s", build.name, delay)
                finally:
                    hit.tried.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
        finally:
            del self._hits[build.id]
            if hit.request_id:
                del self._asked[hit.request_id]

    def run(self, build_id: str) -> BuildRun | None:
        hit = self._hits.get(build_id)
        return hit.run if hit is not None else None

    def asked(self, request_id: str) -> tuple[str, str] | None:
        """The build a hit not yet stored answered ``request_id`` with, and the request's fingerprint."""
        hit = self._asked.get(request_id)
        return (hit.run.build.id, hit.fingerprint) if hit is not None else None

    def held(self) -> set[str]:
        return {key for hit in self._hits.values() for key in hit.run.holds}

    async def tried(self) -> None:
        """Wait until the record of every hit answered so far is stored, or has failed to be once (the
        database fails: whatever waits for this would fail with it, rather than wait for its return)."""
        await asyncio.gather(*(hit.tried.wait() for hit in list(self._hits.values()) if hit.write))

    async def close(self) -> None:
        writes = {hit.write for hit in self._hits.values() if hit.write is not None}
        if not writes:
            return
        _, unwritten = await asyncio.wait(writes, timeout=_RECORD_AT_STOP_SECONDS)
        for write in unwritten:
            logger.error("stopping before %s could be stored", write.get_name().removeprefix("record "))
            write.cancel()
        await asyncio.gather(*unwritten, return_exceptions=True)


class _RequestsAsking:
    """The request ids of the Build calls starting here, so that a start looks for its own once more under
    the start lock only when another start of the same id ran beside it (a retry racing its first call):
    any other start that recorded the id ended before this one looked."""

    def __init__(self) -> None:
        self._starting: dict[str, int] = {}
        self._raced: set[str] = set()

    @contextmanager
    def held(self, request_id: str) -> Iterator[None]:
        if not request_id:
            yield
            return
        if request_id in self._starting:
            self._raced.add(request_id)
        self._starting[request_id] = self._starting.get(request_id, 0) + 1
        try:
            yield
        finally:
            self._starting[request_id] -= 1
            if not self._starting[request_id]:
                del self._starting[request_id]
                self._raced.discard(request_id)

    def raced(self, request_id: str) -> bool:
        return request_id in self._raced


@dataclass(frozen=True, slots=True)
class Started:
    run: BuildRun
    joined: bool
    """The call joined a build that had started before (or had already ended, for a retried request)."""


class Builder:
    def __init__(
        self,
        store: BuildStore,
        registry: RegistryClient,
        code: CodeCache,
        venvs: Venvs,
        images: Images,
        *,
        max_concurrent_builds: int,
        push_registry: str | None,
        redact: Redactor,
        metrics: BuilderMetrics | None = None,
        shared: Flights | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._registry = registry
        self._code = code
        self._venvs = venvs
        self._images = images
        self._push_registry = push_registry
        self._redact = redact
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrent_builds)
        self._starting = asyncio.Lock()
        self._image_locks: Locks = SharedLocks(shared, "image") if shared is not None else KeyedLocks()
        self._flights: dict[FlightKey, BuildRun] = {}
        self._running: dict[str, BuildRun] = {}
        self._hits = HitRecords(store)
        self._asking = _RequestsAsking()
        self._tasks: set[asyncio.Task[None]] = set()
        self._shared = shared
        """Flight locks, where replicas share the database (PostgreSQL)."""
        self.metrics = metrics or BuilderMetrics()
        self.metrics.watch(lambda: [run.build for run in self._running.values() if run.carried_here])

    async def recover(self) -> None:
        """Fail the builds a stopped process did not finish: their callers are gone, nothing was cached.
        Where replicas share the database, only those no live replica carries out or waits to carry on."""
        failure = BuildFailure(FailureReason.BUILD_INFRA, _STOPPED)
        if count := await self._store.fail_unfinished(failure, self._clock()):
            logger.warning("marked %d unfinished builds of a previous run as failed", count)

    async def stop(self) -> None:
        """Abandon the builds under way (each ends FAILED, BUILD_INFRA) so their streams end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._hits.close()

    async def start(self, request: BuildRequest) -> Started:
        """Start a build, join the identical one under way, or replay the one a retried request started."""
        fingerprint = request_fingerprint(
            {
                "job_version": request.job_version,
                "kind": request.kind.value,
                "push": request.options.push,
                "no_cache": request.options.no_cache,
                "run": request.run,
            }
        )
        with self._asking.held(request.request_id):
            fresh = True
            if request.request_id and (earlier := await self._replayed(request.request_id, fingerprint)):
                if (rejoined := await self._rejoin(earlier)) is not None:
                    return rejoined
                request, fresh = _remembered(request), False
            span = tracer.start_span("build", attributes={"takeoff.job_version": request.job_version})
            try:
                with trace.use_span(span, record_exception=True, set_status_on_exception=True):
                    started = await self._start(request, fingerprint, span, fresh=fresh)
            except BaseException:
                span.end()
                raise
        if started.joined:
            span.set_attribute("takeoff.build_joined", True)
            span.end()
        return started

    async def _start(
        self, request: BuildRequest, fingerprint: str, span: trace.Span, *, fresh: bool
    ) -> Started:
        """``fresh``: the request id led to no build before (a request that did goes the way of its flight,
        to that build)."""
        with tracer.start_as_current_span("build.resolve"):
            spec = await self._registry.job_version(request.job_version)
            self._check_request(spec, request)
            keys = self._keys(spec, request.kind)
        span.set_attributes({"takeoff.project": spec.project, "takeoff.job_version": spec.version_name})
        if keys is not None:
            span.set_attribute("takeoff.build_key", keys.build)
        flight: FlightKey = (
            request.kind,
            keys.build if keys else _image_reference(spec),
            request.options.push,
            request.options.no_cache,
        )
        async with self._starting:
            if (
                request.request_id
                and self._asking.raced(request.request_id)
                and (earlier := await self._replayed(request.request_id, fingerprint))
            ):
                if (rejoined := await self._rejoin(earlier)) is not None:
                    return rejoined
                request, fresh = _remembered(request), False
            if (under_way := self._flights.get(flight)) is not None:
                await self._remember(request, fingerprint, under_way.build.id)
                return Started(under_way, joined=True)
            if fresh and (hit := await self._answer_from_cache(request, fingerprint, spec, keys)) is not None:
                span.end()  # the build ended with its cache look-up
                return Started(hit, joined=False)
            if self._shared is not None:
                return await self._start_shared(request, fingerprint, spec, keys, flight=flight, span=span)
            run = await self._new_run(request, fingerprint, spec, keys)
            self._launch(run, flight, self._carry_out(run, spec, flight, span))
        return Started(run, joined=False)

    async def _start_shared(
        self,
        request: BuildRequest,
        fingerprint: str,
        spec: JobSpec,
        keys: BuildKeys | None,
        *,
        flight: FlightKey,
        span: trace.Span,
    ) -> Started:
        """Carry the flight out here, follow it from the database while another replica carries it out,
        or carry on the one whose holder died (docs/design.md §6, "Cache layout and single flight")."""
        assert self._shared is not None
        lock = await self._shared.lock(self._shared.key("flight", flight))
        changes: Changes | None = None
        try:
            async with lock.starting(self._shared.key("flight start", flight)):
                holder = await lock.try_take()
                under_way = await self._store.unfinished(lock.key)
                if not holder and under_way is None:
                    await lock.take()  # its holder has just ended it and lets go in a moment
                    holder = True
                if under_way is None:
                    run = await self._new_run(request, fingerprint, spec, keys, flight_lock=lock.key)
                else:
                    await self._remember(request, fingerprint, under_way.id)
                    if not holder:  # listening first, so that no change after the read goes unnoticed
                        changes = await self._shared.changes(under_way.id)
                    run = await self._follower(under_way, spec)
        except BaseException:
            if changes is not None:
                await changes.close()
            await lock.release()
            raise
        if under_way is None:
            self._launch(run, flight, self._carry_out(run, spec, flight, span, lock))
            return Started(run, joined=False)
        # The call's own span ends when it joins; the following and carrying on are a span of their own.
        context = trace.set_span_in_context(span)
        if changes is None:
            carry_on = tracer.start_span("build.carry_on", context=context)
            self._launch(run, flight, self._carry_out(run, spec, flight, carry_on, lock))
        else:
            follow = tracer.start_span("build.follow", context=context)
            self._launch(run, flight, self._follow(run, spec, flight, follow, lock=lock, changes=changes))
        return Started(run, joined=True)

    async def _replayed(self, request_id: str, fingerprint: str) -> str | None:
        """The build ``request_id`` started or joined before, or None when it is new."""
        asked = self._hits.asked(request_id)
        if asked is not None and asked[1] == fingerprint:
            return asked[0]
        if asked is not None:  # stored first, so that the store tells of the conflict as for any other
            await self._hits.tried()
        return await self._store.replay(BUILD_SCOPE, request_id, fingerprint)

    async def _remember(self, request: BuildRequest, fingerprint: str, build_id: str) -> None:
        if request.request_id:
            await self._store.remember(BUILD_SCOPE, request.request_id, fingerprint, build_id)

    async def _answer_from_cache(
        self, request: BuildRequest, fingerprint: str, spec: JobSpec, keys: BuildKeys | None
    ) -> BuildRun | None:
        """A venv or image build (not pushed: a push asks the registry) whose result is cached, ended at once
        from the cache with nothing written before the answer: its record follows (``HitRecords``), and a
        venv's and its code's leases are renewed on disk (``Shelf.hand_out``). None when anything is
        missing or does not fit: the build then goes the usual way, which looks again and fails or builds
        as it must."""
        if request.kind is BuildKind.NOOP or request.options.push or request.options.no_cache or keys is None:
            return None
        build = Build(
            id=_hit_id(request, fingerprint),
            job_version=spec.version_name,
            kind=request.kind,
            options=request.options,
            create_time=self._clock(),
            run=request.run,
            environment_key=keys.environment,
            build_key=keys.build,
        )
        run = self._prepared(BuildRun(build, redact=self._redact, clock=self._clock), spec)
        self._hits.hold(run)  # from before the look-up: retention here leaves the entries alone from now on
        try:
            found = await self._cached(build, spec)
        except BaseException:
            self._hits.let_go(run)
            raise
        if found is None:
            self._hits.let_go(run)
            return None
        detail, result = found
        self.metrics.started.labels(build.kind.value).inc()
        self._cache_checked(run, True, detail)
        run.end(result)
        self.metrics.build_finished(build)
        run.publish_end()
        self._hits.record(run, request.request_id, fingerprint)
        return run

    async def _cached(self, build: Build, spec: JobSpec) -> tuple[str, BuildResult] | None:
        """The cache detail and the result of ``build`` when everything it makes is cached, else None."""
        if build.kind is BuildKind.VENV:
            found = await asyncio.to_thread(self._hand_out, spec, build.environment_key)
            if found is None:
                return None
            venv, code = found
            return "venv hit, code hit", _venv_result(build, venv, code, cache_hit=True)
        tag = self._images.tag(spec, build.build_key)
        try:
            # As a build looks: retention removes an image under this lock, and not one a hit holds.
            async with self._image_locks.hold(tag):
                image = await self._images.find(tag, ask_registry=False)
        except BuildError:  # the usual way fails the build as it should
            return None
        if not image.image_id:
            return None
        return f"image {tag} hit", BuildResult(
            environment_key=build.environment_key,
            build_key=build.build_key,
            cache_hit=True,
            image=tag,
            image_id=image.image_id,
        )

    def _hand_out(self, spec: JobSpec, environment_key: str) -> tuple[Path, Path] | None:
        """The cached venv and code of a build, if both are there and the build context fits; blocks."""
        venv = self._venvs.hand_out(environment_key)
        code = self._code.hand_out(spec) if venv is not None else None
        if venv is None or code is None:
            return None
        try:
            _check_build_context(spec, code)
        except BuildFailed:
            return None
        return venv, code

    async def _new_run(
        self,
        request: BuildRequest,
        fingerprint: str,
        spec: JobSpec,
        keys: BuildKeys | None,
        *,
        flight_lock: int = 0,
    ) -> BuildRun:
        build = Build(
            id=uuid.uuid4().hex,
            job_version=spec.version_name,
            kind=request.kind,
            options=request.options,
            create_time=self._clock(),
            run=request.run,
            environment_key=keys.environment if keys else "",
            build_key=keys.build if keys else "",
        )
        run = self._prepared(BuildRun(build, redact=self._redact, clock=self._clock), spec)
        await self._hits.tried()  # records are listed in the order their builds were asked for
        await self._store.insert(
            build,
            request_id=request.request_id,
            fingerprint=fingerprint,
            flight_lock=flight_lock,
            holds=run.holds,
        )
        return run

    async def _follower(self, build: Build, spec: JobSpec) -> BuildRun:
        """A run of ``build``, under way or left unfinished elsewhere, with what it has stored so far."""
        fresh = dataclasses.replace(build, cache_hit=False, cache_detail=None, log_line_count=0)
        run = BuildRun(fresh, redact=self._redact, clock=self._clock)
        run.carried_here = False
        run.catch_up(build, await self._store.log_lines(build.id))
        return self._prepared(run, spec)

    def _prepared(self, run: BuildRun, spec: JobSpec) -> BuildRun:
        build = run.build
        run.holds = frozenset(
            {build.environment_key, spec.source_digest}
            if build.kind is BuildKind.VENV
            else {self._images.tag(spec, build.build_key), spec.source_digest}
            if build.kind is BuildKind.IMAGE
            else set()
        )
        return run

    def _launch(self, run: BuildRun, flight: FlightKey, work: Coroutine[None, None, None]) -> None:
        self._flights[flight] = run
        self._running[run.build.id] = run
        task = asyncio.create_task(work, name=f"build {run.build.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get(self, build_id: str, *, include_log: bool) -> tuple[Build, list[str]]:
        if (run := self._running.get(build_id) or self._hits.run(build_id)) is not None:
            return run.snapshot(), list(run.log_lines) if include_log else []
        build = await self._store.get(build_id)
        if build is None:
            raise _build_not_found(build_id)
        return build, await self._store.log_lines(build_id) if include_log else []

    async def list(self, query: BuildQuery, page: PageRequest) -> tuple[list[tuple[Build, int]], bool]:
        """A page of builds, newest first, each with the cursor after it (those under way as they are now),
        and whether more follow."""
        await self._hits.tried()
        builds, more = await self._store.list(query, page)
        return [
            (run.snapshot() if (run := self._running.get(build.id)) is not None else build, cursor)
            for build, cursor in builds
        ], more

    async def _rejoin(self, build_id: str) -> Started | None:
        """The build a retried request started, or None when another replica carries it out (or did, and
        died): then the request goes the way of its flight, which leads to that build."""
        if (run := self._running.get(build_id) or self._hits.run(build_id)) is not None:
            return Started(run, joined=True)
        build = await self._store.get(build_id)
        if build is None:
            raise _build_not_found(build_id)
        if self._shared is not None and not build.state.is_terminal:
            return None
        lines = await self._store.log_lines(build_id)
        return Started(BuildRun.replay(build, lines, redact=self._redact, clock=self._clock), joined=True)

    def _check_request(self, spec: JobSpec, request: BuildRequest) -> None:
        image_job = isinstance(spec.source, ImageSource)
        if image_job != (request.kind is BuildKind.NOOP):
            fits = "noop" if image_job else "venv or image"
            source = "an image" if image_job else "a code or git"
            problem = f"{spec.version_name} has {source} source: build it as {fits}"
            raise InvalidArgument(
                "BUILD_KIND_INCOMPATIBLE", problem, violations=[FieldViolation("kind", problem)]
            )
        if request.options.push:
            if request.kind is not BuildKind.IMAGE:
                problem = "only image builds can be pushed"
                raise InvalidArgument(
                    "ARGUMENT_INVALID",
                    f"options.push: {problem}",
                    violations=[FieldViolation("options.push", problem)],
                )
            if self._push_registry is None:
                raise FailedPrecondition(
                    "PUSH_REGISTRY_NOT_CONFIGURED",
                    "a push was requested but this builder has no registry to push to "
                    "(set TAKEOFF_PUSH_REGISTRY)",
                )

    def _keys(self, spec: JobSpec, kind: BuildKind) -> BuildKeys | None:
        if kind is BuildKind.NOOP:
            return None
        if kind is BuildKind.IMAGE:
            return build_keys(
                spec, kind, base_image=self._images.base_image(spec), sdk_wheel=self._images.sdk_wheel.sha256
            )
        return build_keys(spec, kind, base_image="", sdk_wheel="")

    async def _carry_out(
        self,
        run: BuildRun,
        spec: JobSpec,
        flight: FlightKey,
        span: trace.Span,
        lock: FlightLock | None = None,
    ) -> None:
        with trace.use_span(span, end_on_exit=True):
            await self._carry_out_in(run, spec, flight, span, lock)

    async def _follow(
        self,
        run: BuildRun,
        spec: JobSpec,
        flight: FlightKey,
        span: trace.Span,
        *,
        lock: FlightLock,
        changes: Changes,
    ) -> None:
        """Follow a build another replica carries out: its stored progress as it is notified, until it
        ends or the lock is granted here, which means its holder ended it or died; carry it on then."""
        with trace.use_span(span, end_on_exit=True):
            granted = asyncio.create_task(lock.take())
            try:
                try:
                    while not run.build.state.is_terminal and not granted.done():
                        changed = asyncio.create_task(changes.changed.wait())
                        await asyncio.wait({granted, changed}, return_when=asyncio.FIRST_COMPLETED)
                        changed.cancel()
                        changes.changed.clear()
                        await self._catch_up(run)
                    if not run.build.state.is_terminal:
                        await granted
                        await self._catch_up(run)
                finally:
                    granted.cancel()
                    await asyncio.gather(granted, return_exceptions=True)
                    await changes.close()
            except asyncio.CancelledError:
                await self._abandon(run, flight, lock)
                raise
            except Exception:
                logger.exception("could not follow %s", run.build.name)
                run.end(
                    run.failure(FailureReason.BUILD_INFRA, "the builder lost track of the build; see its log")
                )
                await self._abandon(run, flight, lock)
                return
            if run.build.state.is_terminal:
                await lock.release()
                self._finish(run, flight)
                return
            await self._carry_out_in(run, spec, flight, span, lock)

    async def _catch_up(self, run: BuildRun) -> None:
        stored = await self._store.get(run.build.id)
        if stored is None:  # pruned, which only ended builds are
            raise LookupError(f"{run.build.name} is gone from the database")
        run.catch_up(stored, await self._store.log_lines(run.build.id, first_line=len(run.log_lines)))

    async def _carry_out_in(
        self, run: BuildRun, spec: JobSpec, flight: FlightKey, span: trace.Span, lock: FlightLock | None
    ) -> None:
        self.metrics.started.labels(run.build.kind.value).inc()
        progress = run.progress = _Progress(self._store, run) if lock is not None else None
        if not run.carried_here:  # taken over: what the stream and the stored log told so far goes on
            run.carried_here = True
            run.log(_CARRIED_ON)
        cancelled = False
        try:
            match run.build.kind:
                case BuildKind.VENV:
                    outcome: BuildResult | BuildFailure = await self._build_venv(run, spec)
                case BuildKind.IMAGE:
                    outcome = await self._build_image(run, spec)
                case BuildKind.NOOP:
                    outcome = await self._check_image(run, spec)
        except BuildError as error:
            outcome = run.failure(error.reason, error.message)
        except asyncio.CancelledError:
            cancelled = True
            outcome = run.failure(FailureReason.BUILD_INFRA, _STOPPED)
        except Exception:
            logger.exception("%s failed unexpectedly", run.build.name)
            outcome = run.failure(FailureReason.BUILD_INFRA, "the builder failed unexpectedly; see its log")
        if cancelled and lock is not None and progress is not None:
            # Stopping hands the build over rather than failing it: what it logged is stored, and the lock
            # goes to a replica that follows it (or to whoever asks for it next).
            try:
                await progress.close()
            finally:
                run.end(outcome)
                await self._abandon(run, flight, lock)
            raise asyncio.CancelledError
        run.end(outcome)
        span.set_attribute("takeoff.cache_hit", run.build.cache_hit)
        if isinstance(outcome, BuildFailure):
            span.set_status(trace.StatusCode.ERROR, outcome.reason.value)
        self.metrics.build_finished(run.build)
        try:
            if progress is not None:
                await progress.close()
            else:
                await self._store.update(run.build, log_lines=run.log_lines)
        except Exception:
            logger.exception("could not record the end of %s", run.build.name)
        finally:
            if lock is not None:
                await lock.release()
            self._finish(run, flight)
        if cancelled:
            raise asyncio.CancelledError

    async def _abandon(self, run: BuildRun, flight: FlightKey, lock: FlightLock) -> None:
        """End the build for this replica's callers only: the row is left as it is for another replica."""
        await lock.release()
        if not run.build.state.is_terminal:
            run.end(run.failure(FailureReason.BUILD_INFRA, _STOPPED))
        self._finish(run, flight)

    def _finish(self, run: BuildRun, flight: FlightKey) -> None:
        run.publish_end()
        del self._flights[flight]
        del self._running[run.build.id]

    def image_lock(self, tag: str) -> AbstractAsyncContextManager[None]:
        """What an image build of ``tag`` holds while it looks for the image and makes it."""
        return self._image_locks.hold(tag)

    def held(self) -> set[str]:
        """What the builds under way use or make: their environment keys (venvs), source digests (code)
        and image tags, and the cache hits not yet stored. Retention leaves these alone (docs/design.md §9,
        "Retention")."""
        return {key for run in self._running.values() for key in run.holds} | self._hits.held()

    async def held_elsewhere(self) -> set[str]:
        """What builds under way on other replicas sharing the database (and this one) hold, as stored."""
        return await self._store.unfinished_holds() if self._shared is not None else set()

    @asynccontextmanager
    async def _slot(self, run: BuildRun) -> AsyncIterator[None]:
        """Wait in QUEUED for a build slot, then run in it."""
        async with self._slots:
            run.build.state = BuildState.RUNNING
            run.build.start_time = self._clock()
            if run.progress is not None:
                run.changed.set()
            else:
                await self._store.update(run.build)
            yield

    async def _build_venv(self, run: BuildRun, spec: JobSpec) -> BuildResult:
        build = run.build
        no_cache = build.options.no_cache
        venv = None if no_cache else await self._venvs.lookup(build.environment_key)
        code = None if no_cache else await self._code.lookup(spec)
        hit = venv is not None and code is not None
        self._cache_checked(run, hit, f"venv {_hit_or_miss(venv)}, code {_hit_or_miss(code)}")
        if venv is None or code is None:
            async with self._slot(run):
                with tracer.start_as_current_span("build.fetch_source"):
                    code = await self._code.ensure(spec, run.log, rebuild=no_cache)
                _check_build_context(spec, code)
                with tracer.start_as_current_span("build.install"):
                    venv = await self._venvs.ensure(
                        build.environment_key, spec.environment, run.log, rebuild=no_cache
                    )
        else:
            _check_build_context(spec, code)
        return _venv_result(build, venv, code, cache_hit=hit)

    async def _build_image(self, run: BuildRun, spec: JobSpec) -> BuildResult:
        build = run.build
        push = build.options.push
        tag = self._images.tag(spec, build.build_key)
        async with self._image_locks.hold(tag):
            found = None if build.options.no_cache else await self._images.find(tag, ask_registry=push)
            local = found is not None and bool(found.image_id)
            in_registry = found is not None and bool(found.digest)
            # A pushed image is found in its registry by every replica, whichever engine made it: the
            # runners pull it from there, so an engine that lacks it has nothing to build.
            hit = local or in_registry
            if not push:
                detail = f"image {tag} {'hit' if hit else 'miss'}"
            elif local:
                detail = f"image {tag} hit, " + ("in the registry" if in_registry else "to be pushed")
            else:
                detail = f"image {tag} " + ("hit in the registry" if in_registry else "miss, to be pushed")
            self._cache_checked(run, hit, detail)
            if found is not None and hit:
                image_id = found.image_id
            else:
                async with self._slot(run):
                    with tracer.start_as_current_span("build.fetch_source"):
                        code = await self._code.ensure(spec, run.log, rebuild=build.options.no_cache)
                    _check_build_context(spec, code)
                    labels = {"takeoff.job-version": spec.version_name, BUILD_KEY_LABEL: build.build_key}
                    with tracer.start_as_current_span(
                        "build.image", attributes={"container.image.name": tag}
                    ):
                        image_id = await self._images.build(
                            spec, code, tag, run.log, labels=labels, no_cache=build.options.no_cache
                        )
                    in_registry = False
            digest = found.digest if found is not None and in_registry else ""
            if push and not in_registry:
                with tracer.start_as_current_span(
                    "build.image", attributes={"container.image.name": tag, "takeoff.push": True}
                ):
                    digest = await self._images.push(tag, run.log)
        return BuildResult(
            environment_key=build.environment_key,
            build_key=build.build_key,
            cache_hit=hit,
            image=tag,
            image_id=image_id,
            image_digest=digest,
            pushed=push,
        )

    def _cache_checked(self, run: BuildRun, hit: bool, detail: str) -> None:
        run.cache_checked(hit, detail)
        trace.get_current_span().set_attribute("takeoff.cache_hit", hit)
        self.metrics.cache.labels(run.build.kind.value, "hit" if hit else "miss").inc()

    async def _check_image(self, run: BuildRun, spec: JobSpec) -> BuildResult:
        reference = _image_reference(spec)
        run.log(f"looking for the image {reference}")
        with tracer.start_as_current_span("build.image", attributes={"container.image.name": reference}):
            found = await self._images.find(reference, ask_registry=False)
            if not found.image_id:
                found = await self._images.find(reference, ask_registry=True)
        if not found.image_id and not found.digest:
            raise BuildFailed(f"the image {reference} does not exist locally or in its registry")
        run.log(f"found {reference} " + ("in the local engine" if found.image_id else "in its registry"))
        return BuildResult(image=reference, image_id=found.image_id, image_digest=found.digest)


def _remembered(request: BuildRequest) -> BuildRequest:
    """``request`` without its request id, which is already recorded with the build it leads to."""
    return dataclasses.replace(request, request_id="")


def _hit_id(request: BuildRequest, fingerprint: str) -> str:
    """A cache hit's build id: derived from its request id when it has one, so that a retry another replica
    answers before the first answer's record is stored makes the same record rather than a second."""
    if not request.request_id:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{BUILD_SCOPE}\0{request.request_id}\0{fingerprint}".encode()).hexdigest()[:32]


def _hit_or_miss(found: Path | None) -> str:
    return "hit" if found is not None else "miss"


def _build_not_found(build_id: str) -> NotFound:
    name = f"builds/{build_id}"
    return NotFound("BUILD_NOT_FOUND", f"{name} does not exist", metadata={"resource": name})


def _venv_result(build: Build, venv: Path, code: Path, *, cache_hit: bool) -> BuildResult:
    return BuildResult(
        environment_key=build.environment_key,
        build_key=build.build_key,
        cache_hit=cache_hit,
        venv_path=str(venv),
        code_path=str(code),
        python_path=str(venv_python(venv)),
    )


def _check_build_context(spec: JobSpec, code: Path) -> None:
    context = spec.environment.build_context
    if not context:
        return
    directory = (code / context).resolve()
    if not directory.is_relative_to(code.resolve()) or not directory.is_dir():
        raise BuildFailed(f"the build context {context!r} is not a directory of the job's source")


def _image_reference(spec: JobSpec) -> str:
    assert isinstance(spec.source, ImageSource)
    return spec.source.reference
