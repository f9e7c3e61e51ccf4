"""A real agent whose ``queue_address`` lists two queue replicas on one PostgreSQL database runs a job;
kill -9 of the replica its session is on costs a reconnect to the other, not the lease nor the job
(docs/design.md §5 "Several queue replicas", "Clients and agents fail over").

The services and the agent are this directory's (a registry, a builder, ``python -m takeoff_agent``), with
the queue service replaced by two ``TAKEOFF_REPLICAS=true`` processes and the stack's queue address by both
of theirs, so the test's own calls fail over too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.agent.conftest import WAITER, Stack, StartAgent, code_job, job_pid, running_agent
from tests.keys import ADMIN_KEY
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, pid_alive, wait_for
from tests.queue.harness import struct
from tests.queue.replicas_harness import Replica, queue_replicas, replica_env

pytestmark = pytest.mark.postgres

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
LEASE_TTL_SECONDS = 10.0
"""Long enough that only a lost lease, never a slow machine, would end the attempt while the agent moves."""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    return LEASE_TTL_SECONDS


@pytest.fixture(scope="module")
def replicas(home: Path, registry: ServiceProcess) -> Iterator[list[Replica]]:
    with postgres_schema_url("failover") as url:
        env = replica_env(registry.address, url, lease_ttl=LEASE_TTL_SECONDS, heartbeat=1.0)
        with queue_replicas(home, env) as replicas:
            yield replicas


@pytest.fixture(scope="module")
def stack(
    home: Path, registry: ServiceProcess, replicas: list[Replica], builder: ServiceProcess
) -> Iterator[Stack]:
    stack = Stack(home, registry.address, ",".join(replica.address for replica in replicas), builder.address)
    yield stack
    stack.close()


def agent_on(replica: Replica, agent: str, *, not_session: str = "") -> queue_pb2.Agent | None:
    """The agent as ``replica`` itself sees it, if a Lease session of it (other than ``not_session``) is
    open there."""
    with open_channel(replica.address, api_key=ADMIN_KEY) as channel:
        agents = queue_pb2_grpc.QueueServiceStub(channel).ListAgents(queue_pb2.ListAgentsRequest()).agents
    return next((a for a in agents if a.name == agent and a.connected and a.session_id != not_session), None)


def test_kill_9_of_the_agents_replica_moves_its_session_to_the_other_keeping_lease_and_job(
    stack: Stack, client: Client, start_agent: StartAgent, replicas: list[Replica], tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "failover", WAITER)
    queue = stack.new_queue()
    go = tmp_path / "go"
    with running_agent(start_agent, [queue]) as agent:
        name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
        running = stack.wait_state(name, RUNNING)
        pid = job_pid(stack, running.run)
        agent_name = agent.status().agent
        first, second = replicas  # pick_first: the session is on the first address that answers
        on_first = wait_for(
            lambda: agent_on(first, agent_name), what="the agent's session on the first replica"
        )
        lease = on_first.leases[0].lease_id

        killed = time.time()
        first.kill()
        on_second = wait_for(
            lambda: agent_on(second, agent_name, not_session=on_first.session_id),
            what="the agent's next session, on the other replica",
        )
        moved = on_second.connect_time.ToMicroseconds() / 1e6 - killed
        print(f"kill -9 to the agent's session on the other replica: {moved:.3f} s")
        assert [held.lease_id for held in on_second.leases] == [lease]  # its Welcome kept the lease
        agent.wait_working_on(name, RUNNING)
        assert pid_alive(pid)  # the job ran on through the move

        go.touch()
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1)
    assert [common_pb2.ItemState.Name(t.to_state) for t in item.transitions] == [
        f"ITEM_STATE_{state}"
        for state in ("PENDING", "LEASED", "BUILDING", "STARTING", "RUNNING", "SUCCEEDED")
    ]
    assert not [t for t in item.transitions if t.reason]  # no AGENT_LOST, nor any other failure
    assert stack.logs(item.run).count(f"pid {pid}") == 1  # one start of the job, on one pid
