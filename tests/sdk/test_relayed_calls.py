"""The SDK's run calls through an agent's run relay (docs/design.md §8 "The run relay") against a real
registry and the agent's real relay: the same answers and the same errors as over gRPC, and a relay that
goes away costs a call a retry, then the run goes on over gRPC."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from takeoff._grpc_run_calls import GrpcRunCalls
from takeoff._relay import RelayRunCalls
from takeoff._run_calls import RunCalls, call_retrying
from takeoff.errors import InvalidArgumentError, NotFoundError, TakeoffError, UnavailableError
from takeoff.v1 import runs_pb2
from takeoff_agent.relay import RunRelay, start_relay
from takeoff_rpc.backoff import RetryPolicy
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess

T = TypeVar("T")


class RelayThread:
    """The agent's relay on an event loop of its own, as the agent runs it, for synchronous SDK calls."""

    def __init__(self, registry: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        relay = self._run(start_relay(f"sdk-test-{uuid.uuid4().hex}", registry, None))
        assert relay is not None
        assert relay.address is not None
        self.relay: RunRelay = relay
        self.address: str = relay.address

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self._run(self.relay.close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@pytest.fixture
def relay(registry: ServiceProcess) -> Iterator[RelayThread]:
    running = RelayThread(registry.address)
    try:
        yield running
    finally:
        running.close()
        running.stop()


def relayed(relay: RelayThread, registry: ServiceProcess) -> RelayRunCalls:
    calls = RelayRunCalls.connect(
        relay.address, ADMIN_KEY, fallback=lambda: GrpcRunCalls(registry.address, ADMIN_KEY)
    )
    assert calls is not None
    return calls


def failure(calls: RunCalls, request: runs_pb2.GetRunRequest) -> TakeoffError:
    with pytest.raises(TakeoffError) as raised:
        calls.call("GetRun", request, runs_pb2.GetRunResponse, timeout=10)
    return raised.value


@pytest.mark.parametrize(
    ("name", "kind"),
    [("projects/p/runs/nobody", NotFoundError), ("runs/not-a-run-name", InvalidArgumentError)],
)
def test_a_refused_call_raises_the_same_error_through_the_relay_as_over_grpc(
    relay: RelayThread, registry: ServiceProcess, name: str, kind: type[TakeoffError]
) -> None:
    direct, through_relay = GrpcRunCalls(registry.address, ADMIN_KEY), relayed(relay, registry)
    try:
        expected = failure(direct, runs_pb2.GetRunRequest(name=name))
        got = failure(through_relay, runs_pb2.GetRunRequest(name=name))
    finally:
        direct.close()
        through_relay.close()

    assert type(got) is type(expected) is kind
    assert (got.code, got.reason, got.message, got.metadata, got.violations) == (
        expected.code,
        expected.reason,
        expected.message,
        expected.metadata,
        expected.violations,
    )


def test_a_run_is_created_and_read_back_through_the_relay(
    relay: RelayThread, registry: ServiceProcess, project: str
) -> None:
    calls = relayed(relay, registry)
    try:
        create = runs_pb2.CreateRunRequest(
            parent=f"projects/{project}", run=runs_pb2.Run(display_name="relayed")
        )
        created = calls.call("CreateRun", create, runs_pb2.CreateRunResponse, timeout=10).run
        read = calls.call(
            "GetRun", runs_pb2.GetRunRequest(name=created.name), runs_pb2.GetRunResponse, 10
        ).run
    finally:
        calls.close()
    assert (read.name, read.display_name) == (created.name, "relayed")


def test_a_relay_that_goes_away_costs_one_retry_then_the_run_dials_the_registry(
    relay: RelayThread, registry: ServiceProcess, project: str
) -> None:
    calls = relayed(relay, registry)
    create = runs_pb2.CreateRunRequest(parent=f"projects/{project}", run=runs_pb2.Run())
    name = calls.call("CreateRun", create, runs_pb2.CreateRunResponse, timeout=10).run.name
    get = runs_pb2.GetRunRequest(name=name)
    relay.close()  # the agent stops: its connections end and nothing listens on the name any more
    try:
        # The call on the broken connection is UNAVAILABLE, which is retried...
        with pytest.raises(UnavailableError, match="relay"):
            calls.call("GetRun", get, runs_pb2.GetRunResponse, timeout=10)
        # ...and the retry, finding no relay to reconnect to, goes to the registry over gRPC.
        policy = RetryPolicy(initial_delay=0.01, max_attempts=3)
        again = call_retrying(
            calls, "GetRun", get, runs_pb2.GetRunResponse, policy=policy, timeout=lambda: 10
        )
    finally:
        calls.close()
    assert again.run.name == name


def test_a_relay_that_is_not_there_is_not_used(registry: ServiceProcess) -> None:
    missing = f"@takeoff-relay-{uuid.uuid4().hex}"
    assert (
        RelayRunCalls.connect(missing, ADMIN_KEY, fallback=lambda: GrpcRunCalls(registry.address, ADMIN_KEY))
        is None
    )
