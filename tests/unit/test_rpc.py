"""takeoff_rpc, the client plumbing of the SDK and the services: channels, retries, decoded statuses.

Calls go to a real ``TakeoffServer`` (real interceptors, so real rich statuses) on a loopback port or a
Unix socket; the import checks run in fresh interpreters and look at ``sys.modules``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import open_aio_channel, open_channel
from takeoff_rpc.retries import TRANSIENT_CODES, call_with_retries, call_with_retries_async
from takeoff_rpc.status import FieldViolation, RpcStatus, decode_rpc_error, status_code
from takeoff_server import errors
from takeoff_server.access import EVERYWHERE, Grant, KeyKind, Permission, Principal, needs
from takeoff_server.interceptors import Context
from takeoff_server.remote_errors import domain_error
from takeoff_server.server import ServiceBinding, TakeoffServer

PROBE = "takeoff.test.RpcProbe"
KEY = "sesame"
"""The key the probe clients present."""
RUN_TOKEN = "run-token"
"""Another key the probe server knows, which a call may bring itself."""
METHODS = ("Echo", "Invalid", "Missing", "Crash", "Authorization", "Stream", "Collect", "Chat")


class OneKey:
    """A ``KeyVerifier`` that knows :data:`KEY` and :data:`RUN_TOKEN`, allowed ``jobs.read`` everywhere."""

    async def verify(self, secret: str) -> Principal | None:
        if secret not in (KEY, RUN_TOKEN):
            return None
        return Principal(
            "keys/probe", "probe", KeyKind.PROJECT, frozenset({Grant(Permission.JOBS_READ, EVERYWHERE)})
        )


class Probe:
    """Methods that answer as a Takeoff service does, counting the calls that reach them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def binding(self) -> ServiceBinding:
        behaviours: dict[str, Callable[[bytes, Context], object]] = {
            "Echo": self.echo,
            "Invalid": self.invalid,
            "Missing": self.missing,
            "Crash": self.crash,
            "Authorization": self.authorization,
        }
        handler = grpc.method_handlers_generic_handler(
            PROBE,
            {
                **{
                    name: grpc.unary_unary_rpc_method_handler(behaviour)
                    for name, behaviour in behaviours.items()
                },
                "Stream": grpc.unary_stream_rpc_method_handler(self.authorization_stream),
                "Collect": grpc.stream_unary_rpc_method_handler(self.authorization_collected),
                "Chat": grpc.stream_stream_rpc_method_handler(self.authorization_chat),
            },
        )
        return ServiceBinding(
            PROBE,
            lambda server: server.add_generic_rpc_handlers((handler,)),
            access={name: needs(Permission.JOBS_READ) for name in METHODS},
        )

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    async def echo(self, request: bytes, context: Context) -> bytes:
        self._count("Echo")
        return request

    async def invalid(self, request: bytes, context: Context) -> bytes:
        self._count("Invalid")
        raise errors.InvalidArgument(
            "CONFIG_INVALID",
            "run config does not match the job's input schema",
            metadata={"job": "train"},
            violations=[
                errors.FieldViolation("run_config.lr", "must be a number"),
                errors.FieldViolation("run_config.epochs", "must be at least 1"),
            ],
        )

    async def missing(self, request: bytes, context: Context) -> bytes:
        self._count("Missing")
        raise errors.NotFound("JOB_NOT_FOUND", "job projects/p/jobs/nope does not exist", metadata={"n": "1"})

    async def crash(self, request: bytes, context: Context) -> bytes:
        self._count("Crash")
        raise RuntimeError("a bug")

    async def authorization(self, request: bytes, context: Context) -> bytes:
        return str(dict(context.invocation_metadata() or ()).get("authorization", "")).encode()

    async def authorization_stream(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield await self.authorization(request, context)

    async def authorization_collected(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        async for _ in requests:
            pass
        return await self.authorization(b"", context)

    async def authorization_chat(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield await self.authorization(request, context)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def address(probe: Probe) -> AsyncIterator[str]:
    server = TakeoffServer([probe.binding()], listen=["127.0.0.1:0"], verifier=OneKey())
    await server.start()
    yield server.addresses[0]
    await server.stop(0)


def aio_method(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{PROBE}/{method}")


def sync_method(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{PROBE}/{method}")


async def aio_failure(target: str, method: str) -> grpc.aio.AioRpcError:
    async with open_aio_channel(target, api_key=KEY) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await aio_method(channel, method)(b"", timeout=10)
    return raised.value


def sync_failure(target: str, method: str) -> grpc.RpcError:
    with open_channel(target, api_key=KEY) as channel, pytest.raises(grpc.RpcError) as raised:
        sync_method(channel, method)(b"", timeout=10)
    return raised.value


def transient_policy(max_attempts: int | None = None) -> RetryPolicy:
    return RetryPolicy(initial_delay=0.05, max_delay=0.5, max_attempts=max_attempts, deadline=60)


# Decoding


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_a_rich_status_decodes_to_its_reason_metadata_and_every_violation(
    address: str, client: str
) -> None:
    if client == "aio":
        error: grpc.RpcError = await aio_failure(address, "Invalid")
    else:
        error = await asyncio.to_thread(sync_failure, address, "Invalid")

    assert decode_rpc_error(error) == RpcStatus(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="CONFIG_INVALID",
        message="run config does not match the job's input schema",
        domain="takeoff.dev",
        metadata={"job": "train"},
        violations=(
            FieldViolation("run_config.lr", "must be a number"),
            FieldViolation("run_config.epochs", "must be at least 1"),
        ),
    )


async def test_a_status_without_details_is_named_by_its_code_and_says_what_was_dialled(
    tmp_path: Path,
) -> None:
    nobody = f"unix:{tmp_path}/nobody.sock"

    status = decode_rpc_error(await aio_failure(nobody, "Echo"), target=nobody)

    assert (status.code, status.reason, status.violations) == (
        grpc.StatusCode.UNAVAILABLE,
        "UNAVAILABLE",
        (),
    )
    assert status.message.startswith(f"cannot reach {nobody} (")


async def aio_authorizations(address: str, **call: object) -> list[bytes]:
    """What the server saw as ``authorization`` on one call of each kind, through an aio channel."""
    async with open_aio_channel(address, api_key=KEY) as channel:
        unary = await aio_method(channel, "Authorization")(b"", timeout=10, **call)  # type: ignore[arg-type]
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{PROBE}/Stream")
        streamed = [reply async for reply in stream(b"", timeout=10, **call)]  # type: ignore[arg-type]
        collect: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"/{PROBE}/Collect")
        collected = await collect(iter([b"", b""]), timeout=10, **call)  # type: ignore[arg-type]
        chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(f"/{PROBE}/Chat")
        chatted = [reply async for reply in chat(iter([b""]), timeout=10, **call)]  # type: ignore[arg-type]
    return [unary, *streamed, collected, *chatted]


def sync_authorizations(address: str, **call: object) -> list[bytes]:
    """:func:`aio_authorizations` through a sync channel."""
    with open_channel(address, api_key=KEY) as channel:
        unary = sync_method(channel, "Authorization")(b"", timeout=10, **call)  # type: ignore[arg-type]
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{PROBE}/Stream")
        streamed = list(stream(b"", timeout=10, **call))  # type: ignore[arg-type]
        collect: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"/{PROBE}/Collect")
        collected = collect(iter([b"", b""]), timeout=10, **call)  # type: ignore[arg-type]
        chat: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(f"/{PROBE}/Chat")
        chatted = list(chat(iter([b""]), timeout=10, **call))  # type: ignore[arg-type]
    return [unary, *streamed, collected, *chatted]


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_a_channel_sends_its_api_key_on_calls_of_every_kind(address: str, client: str) -> None:
    if client == "aio":
        seen = await aio_authorizations(address)
    else:
        seen = await asyncio.to_thread(sync_authorizations, address)

    assert seen == [f"Bearer {KEY}".encode()] * 4


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_a_call_that_brings_its_own_key_keeps_it(address: str, client: str) -> None:
    # The agent writes a run with that run's token on the channel that carries its own agent key.
    own = {"metadata": (("authorization", f"Bearer {RUN_TOKEN}"),)}
    if client == "aio":
        seen = await aio_authorizations(address, **own)
    else:
        seen = await asyncio.to_thread(sync_authorizations, address, **own)

    assert seen == [f"Bearer {RUN_TOKEN}".encode()] * 4


async def test_a_channel_without_a_key_is_refused_by_a_takeoff_server(address: str) -> None:
    async with open_aio_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await aio_method(channel, "Echo")(b"", timeout=10)

    assert decode_rpc_error(raised.value).reason == "KEY_MISSING"


# The services' view of a dependency's answer


async def test_a_dependencys_answer_about_the_request_keeps_its_code_and_reason(address: str) -> None:
    invalid = domain_error(
        decode_rpc_error(await aio_failure(address, "Invalid")), action="resolving", field="job"
    )
    missing = domain_error(
        decode_rpc_error(await aio_failure(address, "Missing")),
        action="resolving",
        field="job",
        metadata={"job": "nope"},
    )

    assert isinstance(invalid, errors.InvalidArgument)
    assert (invalid.reason, invalid.violations) == (
        "CONFIG_INVALID",
        (
            errors.FieldViolation("job", "must be a number"),
            errors.FieldViolation("job", "must be at least 1"),
        ),
    )
    assert isinstance(missing, errors.NotFound)
    assert (missing.reason, missing.metadata, missing.violations) == (
        "JOB_NOT_FOUND",
        {"n": "1", "job": "nope"},
        (),
    )


async def test_a_dependency_that_fails_or_is_away_is_dependency_unavailable(
    address: str, tmp_path: Path
) -> None:
    nobody = f"unix:{tmp_path}/nobody.sock"
    crashed = domain_error(
        decode_rpc_error(await aio_failure(address, "Crash")),
        action="the registry resolving 'x'",
        field="job",
    )
    away = domain_error(
        decode_rpc_error(await aio_failure(nobody, "Echo"), target=nobody),
        action="the registry resolving 'x'",
        field="job",
    )

    for error in (crashed, away):
        assert isinstance(error, errors.Unavailable)
        assert error.reason == "DEPENDENCY_UNAVAILABLE"
        assert error.message.startswith("the registry resolving 'x' failed (")
    assert "(INTERNAL)" in crashed.message
    assert f"cannot reach {nobody}" in away.message


# Retries


async def test_an_unavailable_call_is_retried_until_the_server_is_up(probe: Probe, tmp_path: Path) -> None:
    target = f"unix:{tmp_path}/late.sock"
    first_failure = asyncio.Event()
    failed_codes: list[grpc.StatusCode] = []

    def on_retry(error: grpc.RpcError, failed_attempts: int, delay: float) -> None:
        failed_codes.append(status_code(error))
        first_failure.set()

    async with open_aio_channel(target, api_key=KEY) as channel:
        echo = aio_method(channel, "Echo")
        calling = asyncio.create_task(
            call_with_retries_async(lambda: echo(b"hello", timeout=10), transient_policy(), on_retry=on_retry)
        )
        await asyncio.wait_for(first_failure.wait(), 30)
        server = TakeoffServer([probe.binding()], listen=[target], verifier=OneKey())
        await server.start()
        try:
            reply = await asyncio.wait_for(calling, 60)
        finally:
            await server.stop(0)

    assert reply == b"hello"
    assert failed_codes
    assert set(failed_codes) == {grpc.StatusCode.UNAVAILABLE}
    assert probe.calls == {"Echo": 1}


async def test_the_sync_helper_retries_an_unavailable_call_until_the_server_is_up(
    probe: Probe, tmp_path: Path
) -> None:
    target = f"unix:{tmp_path}/late.sock"
    first_failure = threading.Event()

    def call() -> bytes:
        with open_channel(target, api_key=KEY) as channel:
            echo = sync_method(channel, "Echo")
            return call_with_retries(
                lambda: echo(b"hello", timeout=10),
                transient_policy(),
                on_retry=lambda error, failed_attempts, delay: first_failure.set(),
            )

    calling = asyncio.ensure_future(asyncio.to_thread(call))
    assert await asyncio.to_thread(first_failure.wait, 30)
    server = TakeoffServer([probe.binding()], listen=[target], verifier=OneKey())
    await server.start()
    try:
        reply = await asyncio.wait_for(calling, 60)
    finally:
        await server.stop(0)

    assert reply == b"hello"
    assert probe.calls == {"Echo": 1}


@pytest.mark.parametrize("method", ["Invalid", "Missing", "Crash"])
async def test_a_call_that_fails_for_good_is_made_once(probe: Probe, address: str, method: str) -> None:
    retries: list[int] = []
    async with open_aio_channel(address, api_key=KEY) as channel:
        rpc = aio_method(channel, method)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call_with_retries_async(
                lambda: rpc(b"", timeout=10),
                transient_policy(max_attempts=5),
                on_retry=lambda error, failed_attempts, delay: retries.append(failed_attempts),
            )

    assert raised.value.code() not in TRANSIENT_CODES
    assert (probe.calls, retries) == ({method: 1}, [])


async def test_retries_stop_after_max_attempts(tmp_path: Path) -> None:
    attempts = 0
    async with open_aio_channel(f"unix:{tmp_path}/nobody.sock", api_key=KEY) as channel:
        echo = aio_method(channel, "Echo")

        async def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            return await echo(b"", timeout=10)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call_with_retries_async(attempt, transient_policy(max_attempts=3))

    assert (raised.value.code(), attempts) == (grpc.StatusCode.UNAVAILABLE, 3)


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata())


@pytest.mark.parametrize(
    ("code", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.ABORTED, False),
        (grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.UNKNOWN, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
    ],
)
def test_only_transient_codes_are_retried(code: grpc.StatusCode, retried: bool) -> None:
    assert (RetryPolicy(max_attempts=2).next_delay(code.name, 1, elapsed=0.0) is not None) == retried


def test_no_wait_crosses_the_deadline() -> None:
    policy = RetryPolicy(initial_delay=5.0, max_delay=5.0, deadline=10.0)
    waits = [policy.next_delay("UNAVAILABLE", 1, elapsed=9.99) for _ in range(200)]

    assert all(wait is not None and 0 <= wait <= 0.01 + 1e-9 for wait in waits)
    assert policy.next_delay("UNAVAILABLE", 1, elapsed=10.0) is None


def test_full_jitter_stays_under_the_capped_exponential_and_spans_it() -> None:
    policy = RetryPolicy(initial_delay=0.1, multiplier=2.0, max_delay=5.0, max_attempts=100)
    rng = random.Random(9)

    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (6, 3.2), (7, 5.0), (10_000, 5.0)]:
        assert policy.backoff_ceiling(retry) == pytest.approx(ceiling)
        waits = [policy.delay(retry, rng) for _ in range(500)]
        assert all(0 <= wait <= ceiling for wait in waits)
        # Full jitter, not a band around the ceiling: waits near zero and near the ceiling both occur.
        assert min(waits) < 0.1 * ceiling
        assert max(waits) > 0.9 * ceiling


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({}, "never gives up"),
        ({"max_attempts": 0, "deadline": 1.0}, "max_attempts must be at least 1"),
        ({"deadline": 1.0, "initial_delay": 0}, "0 < initial_delay"),
        ({"deadline": 1.0, "multiplier": 0.5}, "multiplier >= 1"),
    ],
)
def test_a_policy_that_cannot_give_up_or_cannot_back_off_is_refused(
    settings: dict[str, float], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        RetryPolicy(**settings)  # type: ignore[arg-type]


# What imports what


def modules_loaded_by(statement: str) -> set[str]:
    probe = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout))


def loaded_packages(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(f"{p}.") for p in packages))


SDK_MACHINERY = ("takeoff.client", "takeoff._run", "takeoff._sender", "takeoff.cli", "rich", "typer")


def test_importing_the_stubs_loads_none_of_the_sdks_machinery() -> None:
    modules = modules_loaded_by(
        "import takeoff.v1.queue_pb2, takeoff.v1.queue_pb2_grpc, takeoff.v1.jobs_pb2, takeoff.v1.runs_pb2"
    )
    assert "takeoff.v1.queue_pb2_grpc" in modules
    assert loaded_packages(modules, SDK_MACHINERY) == []


def test_import_takeoff_loads_a_name_when_it_is_first_used() -> None:
    assert loaded_packages(modules_loaded_by("import takeoff"), SDK_MACHINERY) == []
    assert "takeoff._run" in modules_loaded_by("import takeoff; takeoff.init")
    assert "takeoff.client" in modules_loaded_by("from takeoff import Client")


def test_a_jobs_init_loads_only_what_its_mode_needs() -> None:
    not_for_a_run = ("takeoff.models", "takeoff.client", "takeoff.cli")
    # Online, a run's calls go to the registry over gRPC...
    direct = modules_loaded_by(
        "import takeoff; takeoff.init; import takeoff._online, takeoff._grpc_run_calls"
    )
    assert "grpc" in direct
    assert loaded_packages(direct, not_for_a_run) == []
    # ...or through the relay of the agent that launched the job, which needs no gRPC at all, nor the
    # standard modules that cost most to import (dataclasses loads inspect; pathlib urllib and ipaddress):
    # about 25 ms of every launched job's CPU on a shared two-core machine.
    relayed = modules_loaded_by(
        "import takeoff; takeoff.init; import takeoff._online, takeoff._relay, takeoff._system"
    )
    assert "takeoff._sender" in relayed
    costly = ("grpc", "dataclasses", "inspect", "pathlib")
    assert loaded_packages(relayed, (*costly, *not_for_a_run)) == []
    disabled = modules_loaded_by("import takeoff; takeoff.init(mode='disabled')")
    assert loaded_packages(disabled, ("grpc", *not_for_a_run)) == []


def test_every_public_name_of_the_sdk_resolves() -> None:
    # takeoff.run is None until init, as wandb.run is.
    modules = modules_loaded_by(
        "import takeoff\n"
        "missing = [n for n in takeoff.__all__ if n != 'run' and getattr(takeoff, n, None) is None]\n"
        "assert not missing, missing\nassert set(takeoff.__all__) <= set(dir(takeoff))"
    )
    assert "takeoff.models" in modules


def test_takeoff_rpc_imports_neither_the_sdk_nor_the_server_runtime() -> None:
    modules = modules_loaded_by("import takeoff_rpc")
    assert loaded_packages(modules, ("takeoff", "takeoff_server")) == []


SLOW_HANDSHAKE_SECONDS = 0.5
"""How long the server's first bytes (its HTTP/2 SETTINGS) are held back: longer than the 100 ms gRPC gave a
connection attempt while the channels set `grpc.min_reconnect_backoff_ms`."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float = 0.0) -> None:
    first = True
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            if first and hold:
                await asyncio.sleep(hold)  # the slow handshake is the case, not a wait for anything
            first = False
            writer.write(chunk)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def slow_to_answer(upstream: str) -> AsyncIterator[str]:
    """A TCP relay to ``upstream`` that holds back the server's first bytes, as a loaded machine or a TLS
    handshake across a WAN does."""
    host, port = upstream.rsplit(":", 1)

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            _pipe(client_reader, server_writer),
            _pipe(server_reader, client_writer, hold=SLOW_HANDSHAKE_SECONDS),
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_a_server_slow_to_send_its_settings_is_waited_for_not_unavailable(address: str) -> None:
    async with slow_to_answer(address) as slow, open_aio_channel(slow, api_key=KEY) as channel:
        assert await aio_method(channel, "Authorization")(b"", timeout=10) == f"Bearer {KEY}".encode()
