"""How a run's ``RunService`` calls reach the registry: straight over gRPC, or through the agent that
launched the job (docs/design.md §8 "The run relay").

A job launched by an agent on the same host is given ``TAKEOFF_RELAY``, the agent's relay socket: its calls
go there as plain frames and the agent makes them on a channel it holds open, so the job never imports
gRPC, whose import (asyncio and ssl with it) is most of what a small job costs. Anywhere else (a script run
by hand, a container, a Slurm node), or when the relay cannot be reached, the run dials the registry
itself. Both ways raise the same :class:`takeoff.errors.TakeoffError` and are retried by the same backoff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from takeoff.errors import TakeoffError
from takeoff_rpc.backoff import RetryPolicy, retry_transient

RELAY_ENV = "TAKEOFF_RELAY"
"""The agent's relay socket: ``@name`` for an abstract Unix socket, else a path."""
RUN_SERVICE = "takeoff.v1.RunService"

R = TypeVar("R", bound=Message)


class RunCalls(Protocol):
    """Unary ``RunService`` calls by method name, each raising :class:`TakeoffError` when it fails."""

    target: str
    """What the calls reach, for messages."""

    def call(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        """One attempt at ``method`` (``BatchLogMetrics``); a registry that is briefly away is waited for
        until ``timeout`` seconds (gRPC's ``wait_for_ready``)."""
        ...

    def close(self) -> None: ...


def open_run_calls(registry: str, api_key: str | None) -> RunCalls:
    """Calls through the agent's relay when the job was given one and it answers, else over gRPC to
    ``registry`` presenting ``api_key``."""

    def direct() -> RunCalls:
        from takeoff._grpc_run_calls import GrpcRunCalls  # here: a run through the relay never loads gRPC

        return GrpcRunCalls(registry, api_key)

    relay = os.environ.get(RELAY_ENV, "")
    if relay:
        from takeoff._relay import RelayRunCalls

        calls = RelayRunCalls.connect(relay, api_key, fallback=direct)
        if calls is not None:
            return calls
    return direct()


def call_retrying(
    calls: RunCalls,
    method: str,
    request: Message,
    response: type[R],
    *,
    policy: RetryPolicy,
    timeout: Callable[[], float],
    on_retry: Callable[[TakeoffError, int, float], None] | None = None,
) -> R:
    """``method`` again after each transient failure as ``policy`` allows, each attempt given
    ``timeout()`` seconds; raises the last :class:`TakeoffError`. Only for calls safe to repeat."""
    return retry_transient(
        lambda: calls.call(method, request, response, timeout()), policy, TakeoffError, _code, on_retry
    )


def _code(error: TakeoffError) -> str:
    return error.code
