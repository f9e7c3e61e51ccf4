"""The agent's calls to the registry (runs) and the builder, retried while those services are away.

An agent outlives restarts of the services it talks to: a call that finds its peer unavailable is tried
again with jittered backoff inside the lease, before any attempt is spent (docs/design.md §16). Each call
also tells the agent's :class:`~takeoff_agent.reachability.Reachability` whether its service answered, so
that the agent takes no new work while one does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from takeoff.v1 import (
    build_pb2,
    build_pb2_grpc,
    common_pb2,
    runs_pb2,
    runs_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from takeoff_agent.reachability import Peer, Reachability
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import open_aio_channel
from takeoff_rpc.retries import TRANSIENT_CODES, call_with_retries_async
from takeoff_rpc.status import decode_rpc_error, status_code
from takeoff_server.protovalues import dict_to_struct

logger = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT_SECONDS = 30.0
RETRIES = RetryPolicy(initial_delay=0.2, max_delay=5.0, deadline=30.0)
"""Long enough to outlast a restart of the registry; every call retried here is safe to repeat: CreateRun
carries the run's name as its request_id, AppendLogs its first line's index (the registry skips lines it
has), FinishRun keeps the first final state, GetRun is a read."""

BUILD_PATIENCE_SECONDS = 30.0
"""How long a build waits for a builder that stopped answering, when the caller gives no start deadline."""
BUILD_RETRIES = RetryPolicy(initial_delay=0.2, max_delay=2.0, deadline=BUILD_PATIENCE_SECONDS)
"""How a build waits for its builder: shorter waits than :data:`RETRIES`, because the build is what the
attempt is waiting for; until the attempt's start deadline when the caller gives it."""

MAX_REBUILDS = 3
"""Builds that ended BUILD_INFRA (the builder stopped or was killed under them, an index was unreachable)
started again, under a new request id, before the attempt reports BUILD_INFRA."""

RUN_SERVICE = runs_pb2.DESCRIPTOR.services_by_name["RunService"].full_name
REFUSALS = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)
"""Builder answers that name what is wrong with the build asked for: retrying cannot help."""
BUILD_SERVICE = build_pb2.DESCRIPTOR.services_by_name["BuildService"].full_name


async def _retried(call: Callable[[], Awaitable[T]], what: str, peer: Peer | None) -> T:
    def log_retry(error: grpc.RpcError, failed_attempts: int, delay: float) -> None:
        if peer is not None:
            peer.failed(error)
        logger.warning("%s: %s; retrying in %.1fs", what, status_code(error).name, delay)

    try:
        result = await call_with_retries_async(call, RETRIES, on_retry=log_retry)
    except grpc.RpcError as error:
        if peer is not None:
            peer.failed(error)
        raise
    if peer is not None:
        peer.answered()
    return result


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata presenting ``token`` instead of the channel's key (the channel then adds none:
    ``takeoff_rpc.channels``); None (the channel's key) without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


@dataclass(frozen=True, slots=True)
class LogLine:
    stream: runs_pb2.LogStream.ValueType
    text: str
    rank: int | None = None


class Runs:
    """The registry's RunService, for the runs the agent creates and reports on, and its SecretService,
    for the secrets the agent hands to jobs.

    Each call about one attempt's run takes that attempt's run ``token``, presented instead of the
    agent's key: an agent key may write no run (docs/design.md §13), a run token only its own.
    """

    def __init__(
        self,
        address: str,
        reachability: Reachability | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """``channel``: to the registry at ``address``, presenting the agent's own key (the agent opens it
        with ``takeoff_server.peers.peer_channel``); none: a plain one, without a key."""
        self._channel = channel or open_aio_channel(address)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)
        self._secrets = secrets_pb2_grpc.SecretServiceStub(self._channel)
        self._peer = reachability.watch("registry", self._channel, RUN_SERVICE) if reachability else None

    async def create(
        self,
        run: str,
        *,
        job_version: str,
        item: str,
        attempt: int,
        config: dict[str, object],
        display_name: str,
        token: str | None = None,
    ) -> None:
        project, _, run_id = run.partition("/runs/")
        request = runs_pb2.CreateRunRequest(
            parent=project,
            run_id=run_id,
            run=runs_pb2.Run(
                display_name=display_name,
                job_version=job_version,
                queue_item=item,
                attempt=attempt,
                config=dict_to_struct(config),
            ),
            request_id=run,  # a retry after a lost reply, or after an agent restart, finds the same run
        )
        await _retried(
            lambda: self._runs.CreateRun(request, timeout=CALL_TIMEOUT_SECONDS, metadata=bearer(token)),
            f"create {run}",
            self._peer,
        )

    async def state(self, run: str, *, token: str | None = None) -> common_pb2.RunState.ValueType:
        request = runs_pb2.GetRunRequest(name=run)
        reply = await _retried(
            lambda: self._runs.GetRun(request, timeout=CALL_TIMEOUT_SECONDS, metadata=bearer(token)),
            f"get {run}",
            self._peer,
        )
        return reply.run.state

    async def append_logs(
        self, run: str, lines: list[LogLine], first_index: int, *, token: str | None = None
    ) -> None:
        request = runs_pb2.AppendLogsRequest(
            name=run,
            lines=[runs_pb2.LogLine(stream=line.stream, text=line.text, rank=line.rank) for line in lines],
            first_line_index=first_index,
        )
        await _retried(
            lambda: self._runs.AppendLogs(request, timeout=CALL_TIMEOUT_SECONDS, metadata=bearer(token)),
            f"logs of {run}",
            self._peer,
        )

    async def finish(
        self,
        run: str,
        state: common_pb2.RunState.ValueType,
        *,
        exit_code: int | None,
        message: str,
        token: str | None = None,
    ) -> common_pb2.RunState.ValueType:
        """End ``run`` in ``state`` unless it has ended already; the run's final state either way."""
        request = runs_pb2.FinishRunRequest(
            name=run, state=state, exit_code=exit_code, message=message[-4096:]
        )
        reply = await _retried(
            lambda: self._runs.FinishRun(request, timeout=CALL_TIMEOUT_SECONDS, metadata=bearer(token)),
            f"finish {run}",
            self._peer,
        )
        return reply.run.state

    async def access_secret(self, name: str, *, token: str | None) -> bytes:
        """The value of the secret ``name``, as the attempt whose run ``token`` lists it may read it.
        Retried while the registry is unavailable; any other refusal is raised (grpc.RpcError)."""
        request = secrets_pb2.AccessSecretRequest(name=name)
        reply = await _retried(
            lambda: self._secrets.AccessSecret(request, timeout=CALL_TIMEOUT_SECONDS, metadata=bearer(token)),
            f"access {name}",
            self._peer,
        )
        return reply.value

    async def close(self) -> None:
        await self._channel.close()


class _Delivered:
    """What one build request's events already gave the caller. A reopened stream replays them from the
    start (the builder answers a repeated request_id by following the same build, or its record)."""

    def __init__(self) -> None:
        self.queued = False
        self.cache = False
        self.log_lines = 0
        self._position = 0
        """Log lines the current stream has sent."""

    def reopened(self) -> None:
        self._position = 0

    def new_part(self, event: build_pb2.BuildResponse) -> build_pb2.BuildResponse | None:
        """``event`` less what was delivered before; None when none of it is new."""
        match event.WhichOneof("event"):
            case "queued":
                if self.queued:
                    return None
                self.queued = True
            case "cache":
                if self.cache:
                    return None
                self.cache = True
            case "log":
                lines = event.log.lines
                start, self._position = self._position, self._position + len(lines)
                seen = max(0, min(len(lines), self.log_lines - start))
                self.log_lines = max(self.log_lines, self._position)
                if seen == len(lines):
                    return None
                if seen:
                    log = build_pb2.BuildLog(lines=lines[seen:])
                    return build_pb2.BuildResponse(build=event.build, time=event.time, log=log)
        return event


class Builder:
    """The builder's BuildService."""

    def __init__(
        self,
        address: str,
        reachability: Reachability | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """``channel``: as :class:`Runs` takes it."""
        self._address = address
        self._channel = channel or open_aio_channel(address)
        self._builds = build_pb2_grpc.BuildServiceStub(self._channel)
        self._peer = reachability.watch("builder", self._channel, BUILD_SERVICE) if reachability else None

    async def build(
        self,
        job_version: str,
        kind: build_pb2.BuildKind.ValueType,
        run: str,
        *,
        push: bool = False,
        retry_until: float | None = None,
    ) -> AsyncIterator[build_pb2.BuildResponse]:
        """The events of the build for ``run``, as one stream however often the builder restarts.

        A stream that fails with a transient code is opened again with the same request_id (the run's
        name), and only events not delivered before are passed on. A build that ends BUILD_INFRA is started
        again under a new request id, up to :data:`MAX_REBUILDS` times. Retries go on until ``retry_until``
        (UNIX seconds; the attempt's start deadline), else :data:`BUILD_PATIENCE_SECONDS` after the last
        event; then the stream ends with a BUILD_INFRA failure, as if the builder had sent it. A build the
        builder refuses (e.g. ``push`` without a registry to push to) ends with a CONFIG_INVALID failure.
        """
        request_id, rebuilds, failed = run, 0, 0
        delivered = _Delivered()
        quiet_since = time.monotonic()
        while True:
            call = self._builds.Build(
                build_pb2.BuildRequest(
                    job_version=job_version,
                    kind=kind,
                    run=run,
                    request_id=request_id,
                    options=build_pb2.BuildOptions(push=push),
                )
            )
            delivered.reopened()
            outcome = False
            try:
                async for event in call:
                    self._answered()
                    failed, quiet_since = 0, time.monotonic()
                    if self._rebuild(event, rebuilds, retry_until, quiet_since):
                        rebuilds += 1
                        request_id, delivered = f"{run}~rebuild-{rebuilds}", _Delivered()
                        delay = BUILD_RETRIES.delay(rebuilds)
                        reason = event.failure.message
                        logger.warning("build for %s failed (%s); again in %.1fs", run, reason, delay)
                        break
                    if (new := delivered.new_part(event)) is not None:
                        yield new
                    outcome = event.HasField("result") or event.HasField("failure")
                else:
                    # The stream ends OK right after its outcome: read to that end rather than cancel it, so
                    # the builder records the call as it went. One without an outcome: the caller says so.
                    return
            except grpc.aio.AioRpcError as error:
                if outcome:
                    return  # only the stream's end was lost
                if self._peer is not None:
                    self._peer.failed(error)
                failed += 1
                retry_delay = self._retry_delay(error, failed, retry_until, quiet_since)
                if retry_delay is None:
                    if error.code() in REFUSALS:
                        yield self._refused(error)
                        return
                    if error.code() not in TRANSIENT_CODES:
                        raise
                    yield self._unreachable(error, run)
                    return
                delay = retry_delay
                logger.warning("build for %s: %s; retrying in %.1fs", run, error.code().name, delay)
            finally:
                call.cancel()  # a build outlives its callers: this only lets go of the stream
            await asyncio.sleep(delay)

    def _rebuild(
        self, event: build_pb2.BuildResponse, rebuilds: int, retry_until: float | None, quiet_since: float
    ) -> bool:
        """Whether ``event`` ends a build that should be started again rather than fail the attempt."""
        return (
            event.HasField("failure")
            and event.failure.reason == common_pb2.FAILURE_REASON_BUILD_INFRA
            and rebuilds < MAX_REBUILDS
            and self._time_left(retry_until, quiet_since) > 0
        )

    def _answered(self) -> None:
        if self._peer is not None:
            self._peer.answered()

    @staticmethod
    def _time_left(retry_until: float | None, quiet_since: float) -> float:
        if retry_until is not None:
            return retry_until - time.time()
        return quiet_since + BUILD_PATIENCE_SECONDS - time.monotonic()

    def _retry_delay(
        self, error: grpc.aio.AioRpcError, failed: int, retry_until: float | None, quiet_since: float
    ) -> float | None:
        if error.code() not in TRANSIENT_CODES:
            return None
        left = self._time_left(retry_until, quiet_since)
        return None if left <= 0 else min(BUILD_RETRIES.delay(failed), left)

    def _unreachable(self, error: grpc.aio.AioRpcError, run: str) -> build_pb2.BuildResponse:
        logger.warning("build for %s: the builder did not answer in time (%s)", run, error.code().name)
        return build_pb2.BuildResponse(
            failure=build_pb2.BuildFailure(
                reason=common_pb2.FAILURE_REASON_BUILD_INFRA,
                message=f"the builder at {self._address} could not be reached ({error.code().name}: "
                f"{error.details() or 'no details'})",
            )
        )

    def _refused(self, error: grpc.aio.AioRpcError) -> build_pb2.BuildResponse:
        status = decode_rpc_error(error, target=self._address)
        return build_pb2.BuildResponse(
            failure=build_pb2.BuildFailure(
                reason=common_pb2.FAILURE_REASON_CONFIG_INVALID,
                message=f"the builder refused the build ({status.reason}): {status.message}",
            )
        )

    async def close(self) -> None:
        await self._channel.close()
