"""Adversarial cases of ``FinishedCalls`` (docs/design.md §9 "Databases"): a unary servicer finished though
its caller cancelled the call, on a real grpc.aio server (``TakeoffServer``) on a loopback port. A review
found the case below wrong (D3), and it is fixed. The case itself is checked with :func:`_case`, which
fails the test outright if it was not reached."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from takeoff_rpc.channels import open_aio_channel
from takeoff_server.access import (
    KeyKind,
    KeyScope,
    Permission,
    Principal,
    ProjectRole,
    Rule,
    grants_for,
    needs,
)
from takeoff_server.interceptors import Context
from takeoff_server.server import ServiceBinding, TakeoffServer
from tests.unit.test_server_runtime import insert_into_a_locked_database

PROBE = "takeoff.test.FinishedCallsProbe"
SECRET = "sesame"
PARAMETER = "secret-param"
"""A statement parameter (a secret's value, say) that no log line may quote."""


class CaseNotReached(Exception):
    """The test did not force its case: not the expected failure (an AssertionError)."""


def _case(reached: bool, what: str) -> None:
    if not reached:
        raise CaseNotReached(what)


class OneKey:
    async def verify(self, secret: str) -> Principal | None:
        if secret != SECRET:
            return None
        scope = KeyScope(KeyKind.PROJECT, projects=("projects/a",), role=ProjectRole.WRITE)
        return Principal("keys/alice", "alice", KeyKind.PROJECT, grants_for(scope))


class Probe:
    """``WriteAfterCaller``: waits until its caller has left, then writes to a locked database."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.wrote = asyncio.Event()

    async def write_after_caller(self, request: bytes, context: Context) -> bytes:
        left = asyncio.Event()
        done: Any = context  # the stubs type its callback as a class of their own
        done.add_done_callback(lambda _: left.set())
        self.started.set()
        await left.wait()  # the caller cancelled the call: nobody waits for this answer
        try:
            insert_into_a_locked_database(PARAMETER)
        finally:
            self.wrote.set()
        return b""

    def binding(self) -> ServiceBinding:
        handler = grpc.method_handlers_generic_handler(
            PROBE, {"WriteAfterCaller": grpc.unary_unary_rpc_method_handler(self.write_after_caller)}
        )
        rules: dict[str, Rule] = {"WriteAfterCaller": needs(Permission.JOBS_READ)}
        return ServiceBinding(PROBE, lambda server: server.add_generic_rpc_handlers((handler,)), access=rules)


@pytest.fixture
async def probe() -> AsyncIterator[tuple[Probe, TakeoffServer]]:
    probe = Probe()
    server = TakeoffServer([probe.binding()], listen=["127.0.0.1:0"], verifier=OneKey())
    await server.start()
    try:
        yield probe, server
    finally:
        await server.stop(0)


# D3: a database error after the caller left was logged with SQLAlchemy's message, which quotes the
# statement's parameters: now the driver's error only, as the error guard logs it.
async def test_a_database_error_after_the_caller_left_logs_no_parameters(
    probe: tuple[Probe, TakeoffServer], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, server = probe
    caplog.set_level(logging.INFO)
    async with open_aio_channel(server.addresses[0], api_key=SECRET) as channel:
        stub: Any = channel.unary_unary(f"/{PROBE}/WriteAfterCaller")
        call = stub(b"", metadata=[("x-request-id", "req-d3")])
        await asyncio.wait_for(servicer.started.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(servicer.wrote.wait(), 10)
    await server.stop(0)  # waits for the servicer, and with it for what its end logs
    _case(servicer.wrote.is_set(), "the servicer never wrote after its caller left")
    formatter = logging.Formatter()
    logged = [formatter.format(record) for record in caplog.records]
    _case(any("database is locked" in line for line in logged), "the database error was not logged")
    assert not any(PARAMETER in line for line in logged)
