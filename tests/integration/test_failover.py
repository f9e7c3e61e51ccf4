"""A client and an agent given two queue service addresses (``A,B``) use A, and after kill -9 of A their
next call and the agent's next Lease session go to B, within the agent's reconnect back-off; an agent whose
replica stops answering (SIGSTOP: the connection stays up, as when a host is cut off) goes to B once a
heartbeat goes unanswered for a third of the lease TTL.

A and B are two queue service processes, each on its own SQLite database, standing in for replicas: what
each holds shows which one answered (a queue only A has, one only B has). Replicas sharing PostgreSQL, where
B's Welcome also keeps A's leases, are tests/agent/test_replica_failover.py's (a real agent and job) and
tests/queue/test_replicas.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from typer.testing import CliRunner

from takeoff.cli import app
from takeoff.client import Client
from takeoff.v1 import common_pb2
from takeoff_agent.lease import HelloSpec, LeaseLink
from tests.keys import ADMIN_KEY
from tests.lease_handlers import NoLeases
from tests.processes import ServiceProcess, service_process, until

PROJECT = "failover"
SHORT_LEASES = {"TAKEOFF_LEASE_TTL_SECONDS": "3", "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5"}
"""An agent leaves a replica that answers no heartbeat for a third of the TTL: here 1 s."""
SHARED = "work"
"""The queue both replicas have: the one the agent serves."""


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with service_process("registry", tmp_path_factory.mktemp("failover")) as process:
        yield process
        process.terminate()


def client_of(registry: ServiceProcess, queue_address: str) -> Client:
    return Client(registry.address, queue=queue_address, project=PROJECT, api_key=ADMIN_KEY)


@pytest.fixture
def replicas(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, registry: ServiceProcess
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Queue services A and B, with the settings a test passes as its parameter (else the defaults: a 30 s
    TTL, heartbeats every 10 s, so an agent's Welcome within 10 s comes from a reconnect, not from
    noticing an unanswered heartbeat); each has the queue ``SHARED`` and one named after itself."""
    env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address, **getattr(request, "param", {})}
    with contextlib.ExitStack() as processes:
        started = [
            processes.enter_context(service_process("queue", tmp_path_factory.mktemp(name), env=env))
            for name in ("a", "b")
        ]
        for name, replica in zip(("a", "b"), started, strict=True):
            with client_of(registry, replica.address) as client:
                for queue in (SHARED, f"only-{name}"):
                    client.create_queue(queue)
        yield started[0], started[1]


@contextlib.asynccontextmanager
async def agent_session(target: str, handler: NoLeases) -> AsyncIterator[LeaseLink]:
    hello = HelloSpec(
        agent_id=f"failover-{uuid.uuid4().hex[:8]}",
        display_name="failover",
        queues=[f"projects/{PROJECT}/queues/{SHARED}"],
        resources=[common_pb2.RESOURCE_KIND_LOCAL_PROCESS],
        capacity=1,
        version="test",
    )
    link = LeaseLink(target, hello, handler, api_key=ADMIN_KEY)
    running = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        link.stop()
        await asyncio.wait_for(running, timeout=10)


def connected_agents(registry: ServiceProcess, replica: ServiceProcess) -> set[str]:
    """The agents with a Lease stream open on ``replica``, asked at its own address."""
    with client_of(registry, replica.address) as client:
        return {agent.name for agent in client.list_agents()}


def queue_ids(client: Client) -> set[str]:
    return {queue.name.rpartition("/")[2] for queue in client.list_queues()}


def cli_queue_ids(registry: ServiceProcess, queue_address: str) -> set[str]:
    """``takeoff queue list --json`` with ``TAKEOFF_QUEUE_ADDRESS`` set to the list."""
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_QUEUE_ADDRESS": queue_address,
        "TAKEOFF_PROJECT": PROJECT,
    }
    result = CliRunner().invoke(app, ["queue", "list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return {queue["name"].rpartition("/")[2] for queue in json.loads(result.output)}


async def test_after_kill_9_of_the_first_address_calls_and_the_agents_next_session_go_to_the_second(
    registry: ServiceProcess, replicas: tuple[ServiceProcess, ServiceProcess]
) -> None:
    a, b = replicas
    both = f"{a.address},{b.address}"
    welcomes = NoLeases()
    with client_of(registry, both) as client:
        assert queue_ids(client) == {SHARED, "only-a"}
        assert cli_queue_ids(registry, both) == {SHARED, "only-a"}
        async with agent_session(both, welcomes):
            agent = (await welcomes.next()).agent
            assert connected_agents(registry, a) == {agent}
            assert connected_agents(registry, b) == set()

            a.process.send_signal(signal.SIGKILL)
            a.process.wait()

            assert (await welcomes.next()).agent == agent
            assert connected_agents(registry, b) == {agent}
            assert queue_ids(client) == {SHARED, "only-b"}

    # New clients and agents pass over the dead first address as well.
    assert cli_queue_ids(registry, both) == {SHARED, "only-b"}
    async with agent_session(both, welcomes):
        agent = (await welcomes.next()).agent
        assert connected_agents(registry, b) == {agent}


@pytest.mark.parametrize("replicas", [SHORT_LEASES], indirect=True, ids=["short leases"])
async def test_an_agent_leaves_a_replica_that_stops_answering_for_the_next_address(
    registry: ServiceProcess, replicas: tuple[ServiceProcess, ServiceProcess]
) -> None:
    a, b = replicas
    welcomes = NoLeases()
    async with agent_session(f"{a.address},{b.address}", welcomes):
        agent = (await welcomes.next()).agent
        assert connected_agents(registry, a) == {agent}

        a.process.send_signal(signal.SIGSTOP)  # its connections stay open; it answers nothing
        try:
            assert (await welcomes.next()).agent == agent
            assert connected_agents(registry, b) == {agent}
        finally:
            a.process.send_signal(signal.SIGCONT)


async def test_an_agent_whose_list_names_a_host_that_does_not_resolve_keeps_trying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    welcomes = NoLeases()
    with caplog.at_level(logging.WARNING, logger="takeoff_agent.lease"):
        async with agent_session("127.0.0.1:1,queue.invalid:2", welcomes) as link:
            await until(lambda: tries_logged(caplog, 2), "a second try")
            assert not link.connected
    assert "entry 2 of '127.0.0.1:1,queue.invalid:2': cannot resolve 'queue.invalid'" in caplog.text


async def tries_logged(caplog: pytest.LogCaptureFixture, count: int) -> bool:
    return caplog.text.count("cannot resolve") >= count
