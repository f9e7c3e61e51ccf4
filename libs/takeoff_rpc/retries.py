"""The backoff of :mod:`takeoff_rpc.backoff` applied to gRPC calls, sync and grpc.aio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from takeoff_rpc.backoff import TRANSIENT_CODE_NAMES, RetryPolicy, retry_transient
from takeoff_rpc.status import status_code

T = TypeVar("T")

TRANSIENT_CODES: frozenset[grpc.StatusCode] = frozenset(
    grpc.StatusCode[name] for name in TRANSIENT_CODE_NAMES
)
""":data:`takeoff_rpc.backoff.TRANSIENT_CODE_NAMES` as gRPC's codes."""

RetryHook = Callable[[grpc.RpcError, int, float], None]
"""Told of each retry: the error, how many attempts failed so far, and the wait before the next."""


def _code_name(error: grpc.RpcError) -> str:
    return status_code(error).name


def call_with_retries(
    attempt: Callable[[], T], policy: RetryPolicy, *, on_retry: RetryHook | None = None
) -> T:
    """``attempt()``, again after each transient failure as ``policy`` allows; raises the last error."""
    return retry_transient(attempt, policy, grpc.RpcError, _code_name, on_retry)


async def call_with_retries_async(
    attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, *, on_retry: RetryHook | None = None
) -> T:
    """:func:`call_with_retries` for grpc.aio calls: ``await attempt()``, sleeping without blocking."""
    started, failed = time.monotonic(), 0
    while True:
        try:
            return await attempt()
        except grpc.RpcError as error:
            failed += 1
            delay = policy.next_delay(_code_name(error), failed, time.monotonic() - started)
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(error, failed, delay)
        await asyncio.sleep(delay)
