"""Faults cost time, not work (docs/design.md §5 "The Lease stream", §16): a Complete or Release the queue
service could not commit (answered Reject NOT_COMMITTED, or, from older queue services, its stream ended) is
kept by the agent and sent again, with back-off, until the queue takes it; the item ends once and its job
runs once.

The fault is the queue's own database refusing the write: a trigger that raises for one kind of write of the
test's queue's items, as a full disk or a lock held too long would fail it, in the queue service's SQLite file
and, on PostgreSQL, with SQLSTATE disk_full. Registry, queue service, builder and agent are real processes
(tests/agent/conftest.py).
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import grpc
import psycopg
import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2
from takeoff_agent import lease
from takeoff_server.interceptors import rich_status
from takeoff_server.protovalues import dict_to_struct
from tests.agent.conftest import PROJECT, QUEUE_LOG, AgentProcess, Stack, StartAgent, code_job
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, wait_for

LeaseRequest = queue_pb2.LeaseRequest
LeaseResponse = queue_pb2.LeaseResponse

RUNS_ONCE = """\
import os, pathlib, takeoff
run = takeoff.init()
with open(pathlib.Path(run.config["runs"]), "a") as runs:
    runs.write(f"{os.environ['TAKEOFF_ATTEMPT']} {os.getpid()}\\n")
"""
"""Appends its attempt and pid to the file named by its ``runs`` config, and succeeds."""

FAULT = "the disk is full (a fault the test forces)"
REFUSALS = 8
"""Complete refused this many times: the seven waits between (RESEND, ceilings 0.1 s doubling to 5 s) come
to 5.6 s on average, about twice the lease TTL of these tests (3 s), which the agent's leases outlast."""


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def queue_database_url(request: pytest.FixtureRequest, home: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{home / 'queue.db'}"
        return
    with postgres_schema_url("verdicts") as url:
        yield url


@contextmanager
def writes_refused(database_url: str, queue: str, when: str) -> Iterator[None]:
    """While inside, the queue's database fails every write of an item of ``queue`` ``when`` (SQL on the
    row's OLD and NEW state), and with it the whole group-commit batch; the queue service keeps running."""
    trigger = f"refuse_{queue.rsplit('/', 1)[1].replace('-', '_')}"
    refused = f"NEW.queue = '{queue}' AND {when}"
    if database_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=30)) as connection:
            connection.execute(
                f"CREATE TRIGGER {trigger} BEFORE UPDATE OF state ON queue_items WHEN {refused}"
                f" BEGIN SELECT RAISE(ABORT, '{FAULT}'); END"
            )
            connection.commit()
            try:
                yield
            finally:
                connection.execute(f"DROP TRIGGER {trigger}")
                connection.commit()
        return
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            f"CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{FAULT}' USING ERRCODE = 'disk_full'; END $$"
        )
        connection.execute(
            f"CREATE TRIGGER {trigger} BEFORE UPDATE OF state ON queue_items FOR EACH ROW WHEN ({refused})"
            f" EXECUTE FUNCTION {trigger}()"
        )
        try:
            yield
        finally:
            connection.execute(f"DROP TRIGGER {trigger} ON queue_items")
            connection.execute(f"DROP FUNCTION {trigger}()")


def resends(agent: AgentProcess, message: str = "Complete") -> list[str]:
    """The agent's log lines saying it keeps a ``message`` the queue service did not take, to send again."""
    return [
        line
        for line in agent.log_file.read_text().splitlines()
        if f"the queue service did not take the {message} of lease" in line
    ]


@pytest.mark.parametrize(
    ("message", "refused", "meanwhile"),
    [
        ("Complete", "SUCCEEDED", common_pb2.ITEM_STATE_RUNNING),
        ("Progress", "RUNNING", common_pb2.ITEM_STATE_STARTING),
    ],
    ids=["complete", "progress-running"],
)
def test_a_message_the_queue_could_not_commit_is_sent_again_until_taken_and_the_job_runs_once(
    stack: Stack,
    start_agent: StartAgent,
    queue_database_url: str,
    tmp_path: Path,
    *,
    message: str,
    refused: str,
    meanwhile: int,
) -> None:
    """The ``message`` that moves the item to ``refused`` is not committed: the item stays ``meanwhile``."""
    with Client(stack.registry, project=PROJECT) as client:
        job = code_job(client, tmp_path, "once", RUNS_ONCE)
    queue = stack.new_queue()
    runs = tmp_path / "runs"
    agent = start_agent([queue])
    with writes_refused(queue_database_url, queue, f"NEW.state = '{refused}'"):
        item = stack.enqueue(queue, job, run_config=dict_to_struct({"runs": str(runs)}))
        wait_for(
            lambda: len(resends(agent, message)) >= REFUSALS, timeout=180, what=f"the {message} to be refused"
        )
        assert stack.item(item).state == meanwhile  # nothing of it committed
    ended = stack.wait_ended(item)

    assert (ended.state, ended.attempt) == (common_pb2.ITEM_STATE_SUCCEEDED, 1), ended.transitions
    states = [transition.to_state for transition in ended.transitions]
    assert states.count(common_pb2.ITEM_STATE_RUNNING) == states.count(common_pb2.ITEM_STATE_SUCCEEDED) == 1
    assert not [t for t in ended.transitions if t.reason == common_pb2.FAILURE_REASON_AGENT_LOST]
    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["1"]  # the job ran once
    # Each resend says why: the queue did not commit it (answered NOT_COMMITTED, its stream kept), and the
    # queue's log has the database's error.
    assert all("not committed (the queue's database failed)" in line for line in resends(agent, message))
    assert FAULT in (stack.home / QUEUE_LOG).read_text()


def test_a_release_the_queue_could_not_commit_is_sent_again_while_the_agent_drains(
    stack: Stack, start_agent: StartAgent, queue_database_url: str, builder: ServiceProcess, tmp_path: Path
) -> None:
    """Drained, an agent hands back the work it has not started; a Release refused once was given up on, and
    the lease left to expire as AGENT_LOST (a TTL and a back-off later)."""
    with Client(stack.registry, project=PROJECT) as client:
        job = code_job(client, tmp_path, "released", RUNS_ONCE)
    queue = stack.new_queue()
    agent = start_agent([queue])
    builder.process.send_signal(signal.SIGSTOP)  # the attempt's build waits: its job never starts
    try:
        item = stack.enqueue(queue, job)
        stack.wait_state(item, common_pb2.ITEM_STATE_BUILDING)
        with writes_refused(queue_database_url, queue, "OLD.state = 'BUILDING' AND NEW.state = 'PENDING'"):
            agent.process.send_signal(signal.SIGTERM)
            wait_for(lambda: len(resends(agent, "Release")) >= 2, what="the Release to be refused twice")
        assert agent.process.wait(timeout=60) == 0
    finally:
        builder.process.send_signal(signal.SIGCONT)
    released = stack.item(item)
    assert (released.state, released.attempt) == (common_pb2.ITEM_STATE_PENDING, 1)
    assert released.transitions[-1].reason == common_pb2.FAILURE_REASON_RELEASED, released.transitions


def test_resends_wait_up_to_five_seconds_with_full_jitter() -> None:
    ceilings = [lease.RESEND.backoff_ceiling(retry) for retry in range(1, 64)]
    assert ceilings[0] == pytest.approx(0.1)  # a replica that died costs little
    assert ceilings == sorted(ceilings)
    assert max(ceilings) == 5.0
    rng = random.Random(7)
    late = [lease.RESEND.delay(30, rng) for _ in range(1000)]
    assert min(late) < 0.5
    assert max(late) > 4.5


# ----- A stream the queue service ends ABORTED for one message, in process --------------------------------


LeaseContext = grpc.aio.ServicerContext[LeaseRequest, LeaseResponse]


class AbortsTheFirstComplete:
    """A queue service's Lease stream whose first session ends ABORTED ``CONCURRENT_CHANGE`` at the first
    Complete (other replicas kept changing the item), as queue services before ``NOT_COMMITTED`` did; every
    later Complete is acknowledged."""

    def __init__(self) -> None:
        self.completes: list[int] = []
        """The session (1, 2, ...) each Complete came in."""
        self.sessions = 0

    def handler(self) -> grpc.GenericRpcHandler:
        lease_stream = grpc.stream_stream_rpc_method_handler(
            self._lease,
            request_deserializer=LeaseRequest.FromString,
            response_serializer=LeaseResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler("takeoff.v1.QueueService", {"Lease": lease_stream})

    async def _lease(
        self, request_iterator: AsyncIterator[LeaseRequest], context: LeaseContext
    ) -> AsyncIterator[LeaseResponse]:
        self.sessions += 1
        session = self.sessions
        async for request in request_iterator:
            match request.WhichOneof("message"):
                case "hello":
                    welcome = LeaseResponse.Welcome(session_id=request.hello.session_id)
                    welcome.lease_ttl.FromSeconds(30)
                    welcome.heartbeat_interval.FromSeconds(10)
                    yield LeaseResponse(welcome=welcome)
                case "heartbeat":
                    kind = queue_pb2.LEASE_MESSAGE_KIND_HEARTBEAT
                    yield LeaseResponse(ack=LeaseResponse.Ack(request_sequence=request.sequence, of=kind))
                case "complete":
                    self.completes.append(session)
                    if session == 1:
                        status = rich_status(
                            grpc.StatusCode.ABORTED,
                            "the item kept changing on other replicas",
                            "CONCURRENT_CHANGE",
                        )
                        await context.abort(status.code, status.details, status.trailing_metadata)
                    ack = LeaseResponse.Ack(
                        request_sequence=request.sequence,
                        of=queue_pb2.LEASE_MESSAGE_KIND_COMPLETE,
                        lease_id=request.complete.lease_id,
                        state=common_pb2.ITEM_STATE_SUCCEEDED,
                    )
                    yield LeaseResponse(ack=ack)


class Holds:
    """A LeaseHandler holding one lease."""

    def held_leases(self) -> dict[str, int]:
        return {"l1": 1}

    def draining(self) -> bool:
        return False

    async def on_welcome(self, welcome: LeaseResponse.Welcome) -> None: ...
    async def on_assignment(self, assignment: LeaseResponse.Assignment) -> None: ...
    async def on_cancel(self, cancel: LeaseResponse.Cancel) -> None: ...
    async def on_revoke(self, revoke: LeaseResponse.Revoke) -> None: ...
    def on_renewed(self, until: float) -> None: ...


async def test_a_complete_whose_stream_ended_aborted_is_sent_again_and_the_agent_stays() -> None:
    """ABORTED ends the agent only for SESSION_SUPERSEDED (another process took its id); it ended the agent
    for CONCURRENT_CHANGE too, leaving its verdict unsent and its work to the lease's expiry."""
    queue = AbortsTheFirstComplete()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((queue.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = lease.LeaseLink(
        f"127.0.0.1:{port}", lease.HelloSpec("a1", "a1", ["projects/p/queues/q"], [], 1, "test"), Holds()
    )
    session = asyncio.create_task(link.run())
    try:
        complete = LeaseRequest.Complete(
            lease_id="l1", epoch=1, outcome=common_pb2.ITEM_STATE_SUCCEEDED, exit_code=0
        )
        answer = await asyncio.wait_for(link.send_until_answered(complete=complete), 30)
        assert answer.ack.state == common_pb2.ITEM_STATE_SUCCEEDED
        assert queue.completes == [1, 2]
        assert not session.done()  # still holding a session, not refused
    finally:
        link.stop()
        await asyncio.wait_for(session, 10)
        await server.stop(0)
