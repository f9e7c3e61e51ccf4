"""The agent's calls to the registry (runs) and the builder, retried while those services are away.

An agent outlives restarts of the services it talks to: a call that finds its peer unavailable is tried
again with backoff rather than failing the work.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from takeoff.v1 import build_pb2, build_pb2_grpc, common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_aio_channel
from takeoff_rpc.retries import RetryPolicy, call_with_retries_async
from takeoff_rpc.status import status_code
from takeoff_server.protovalues import dict_to_struct

logger = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT_SECONDS = 30.0
RETRIES = RetryPolicy(initial_delay=0.2, max_delay=5.0, deadline=30.0)
"""Long enough to outlast a restart of the registry; every call retried here is safe to repeat (a read, or
a change carrying a request_id or a first index)."""


async def _retried(call: Callable[[], Awaitable[T]], what: str) -> T:
    def log_retry(error: grpc.RpcError, failed_attempts: int, delay: float) -> None:
        logger.warning("%s: %s; retrying in %.1fs", what, status_code(error).name, delay)

    return await call_with_retries_async(call, RETRIES, on_retry=log_retry)


@dataclass(frozen=True, slots=True)
class LogLine:
    stream: runs_pb2.LogStream.ValueType
    text: str


class Runs:
    """The registry's RunService, for the runs the agent creates and reports on."""

    def __init__(self, address: str) -> None:
        self._channel = open_aio_channel(address)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)

    async def create(
        self,
        run: str,
        *,
        job_version: str,
        item: str,
        attempt: int,
        config: dict[str, object],
        display_name: str,
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
        await _retried(lambda: self._runs.CreateRun(request, timeout=CALL_TIMEOUT_SECONDS), f"create {run}")

    async def state(self, run: str) -> common_pb2.RunState.ValueType:
        reply = await _retried(
            lambda: self._runs.GetRun(runs_pb2.GetRunRequest(name=run), timeout=CALL_TIMEOUT_SECONDS),
            f"get {run}",
        )
        return reply.run.state

    async def append_logs(self, run: str, lines: list[LogLine], first_index: int) -> None:
        request = runs_pb2.AppendLogsRequest(
            name=run,
            lines=[runs_pb2.LogLine(stream=line.stream, text=line.text) for line in lines],
            first_line_index=first_index,
        )
        await _retried(lambda: self._runs.AppendLogs(request, timeout=CALL_TIMEOUT_SECONDS), f"logs of {run}")

    async def finish(
        self, run: str, state: common_pb2.RunState.ValueType, *, exit_code: int | None, message: str
    ) -> None:
        request = runs_pb2.FinishRunRequest(
            name=run, state=state, exit_code=exit_code, message=message[-4096:]
        )
        await _retried(lambda: self._runs.FinishRun(request, timeout=CALL_TIMEOUT_SECONDS), f"finish {run}")

    async def close(self) -> None:
        await self._channel.close()


class Builder:
    """The builder's BuildService."""

    def __init__(self, address: str) -> None:
        self._channel = open_aio_channel(address)
        self._builds = build_pb2_grpc.BuildServiceStub(self._channel)

    async def build(
        self, job_version: str, kind: build_pb2.BuildKind.ValueType, run: str
    ) -> AsyncIterator[build_pb2.BuildResponse]:
        request = build_pb2.BuildRequest(job_version=job_version, kind=kind, run=run, request_id=run)
        async for event in self._builds.Build(request):
            yield event

    async def close(self) -> None:
        await self._channel.close()
