"""Several queue service processes sharing one PostgreSQL database (docs/design.md §5 "Several queue
replicas"), and agents on the Lease stream that run at once whatever they are given."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from tests.postgres import assert_service_wrote_tables
from tests.processes import ServiceProcess, service_process
from tests.queue.harness import ScriptedAgent

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
Assignment = queue_pb2.LeaseResponse.Assignment


def replica_env(registry: str, database_url: str, *, lease_ttl: float, heartbeat: float) -> dict[str, str]:
    """The settings every replica of a test shares: one database, one registry, replicas on."""
    return {
        "TAKEOFF_REPLICAS": "true",
        "TAKEOFF_DATABASE_URL": database_url,
        "TAKEOFF_REGISTRY_ADDRESS": registry,
        "TAKEOFF_LEASE_TTL_SECONDS": str(lease_ttl),
        "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": str(heartbeat),
        "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
        # A test's enqueues come from one key; its pace is the queue's, not the rate limit's.
        "TAKEOFF_ENQUEUES_PER_SECOND": "1000000",
        "TAKEOFF_ENQUEUE_BURST": "1000000",
    }


@dataclass
class Replica:
    process: ServiceProcess
    log: Path
    """Everything the process printed (kept when it is killed: a failure's report quotes it)."""

    @property
    def address(self) -> str:
        return self.process.address

    def kill(self) -> None:
        """kill -9: no goodbye to its agents, no last commit."""
        self.process.process.send_signal(signal.SIGKILL)
        self.process.process.wait()


@contextmanager
def queue_replicas(
    home: Path, env: dict[str, str], count: int = 2, *, first: int = 0
) -> Iterator[list[Replica]]:
    """``count`` real ``python -m takeoff_queue`` processes on ``env``'s database, each on its own loopback
    port and home, all started at once as a deployment's replicas are (the first start on a fresh database
    migrates it once), sharing the key that signs page tokens. ``first``: the number of the first one's home
    (``replica-{n}``), for replicas added to those started before in ``home``."""
    env = {**env, "TAKEOFF_PAGE_TOKEN_KEY_FILE": str(home / "page-token.key")}
    homes = [home / f"replica-{first + index}" for index in range(count)]
    starts = [service_process("queue", replica_home, env=env) for replica_home in homes]
    with ExitStack() as stack, ThreadPoolExecutor(count) as pool:
        for replica_home in homes:
            replica_home.mkdir(parents=True, exist_ok=True)
        started = [pool.submit(start.__enter__) for start in starts]
        for start in starts:  # each is stopped however the others' starts went
            stack.push(start.__exit__)
        replicas = [Replica(process, process.log) for process in (future.result() for future in started)]
        assert_service_wrote_tables(env["TAKEOFF_DATABASE_URL"], "queue_")  # it runs on PostgreSQL
        try:
            yield replicas
        except BaseException:
            for replica in replicas:  # what each replica said, in the failed test's captured output
                print(
                    f"--- {replica.log} (last 60 lines)",
                    *replica.log.read_text().splitlines()[-60:],
                    sep="\n",
                )
            raise
        for replica in replicas:  # all at once: each waits out its shutdown grace
            replica.process.process.send_signal(signal.SIGTERM)
        for replica in replicas:
            # A replica stops within its 5 s grace on a quiet machine; CI's load once stretched one past 20 s.
            # A shutdown that hangs still fails here.
            replica.process.terminate(timeout=60)


@dataclass
class Worker:
    """A scripted agent that runs at once every item it is given: Progress RUNNING, then Complete SUCCEEDED
    once RUNNING is acknowledged. It keeps every Assignment it received."""

    agent: ScriptedAgent
    replica: str
    assignments: list[Assignment] = field(default_factory=list)
    succeeded: int = 0

    async def work(self, done: WorkDone) -> None:
        """Until cancelled; a Reject, a Cancel, a Revoke or the stream's end fails the caller's wait."""
        epochs: dict[str, int] = {}
        send = self.agent.send
        while True:
            response = await self.agent.next(within=done.within)
            kind = response.WhichOneof("message")
            if kind == "assignment":
                assignment = response.assignment
                self.assignments.append(assignment)
                epochs[assignment.lease_id] = assignment.epoch
                await send(
                    progress=queue_pb2.LeaseRequest.Progress(
                        lease_id=assignment.lease_id, epoch=assignment.epoch, state=RUNNING
                    )
                )
            elif kind == "ack" and response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_PROGRESS:
                lease = response.ack.lease_id
                await send(
                    complete=queue_pb2.LeaseRequest.Complete(
                        lease_id=lease, epoch=epochs[lease], outcome=SUCCEEDED
                    )
                )
            elif kind == "ack" and response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_COMPLETE:
                assert response.ack.state == SUCCEEDED, response
                self.succeeded += 1
                done.count()
            else:
                raise AssertionError(
                    f"agent on {self.replica} got {response} (stream error: {self.agent.error})"
                )


@dataclass
class WorkDone:
    """Set once ``total`` Completes were acknowledged across every worker."""

    total: int
    within: float
    acknowledged: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    _milestones: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    def count(self) -> None:
        self.acknowledged += 1
        for count, reached in self._milestones:
            if self.acknowledged >= count:
                reached.set()
        if self.acknowledged >= self.total:
            self.event.set()

    async def reached(self, count: int) -> None:
        """Once ``count`` Completes were acknowledged."""
        reached = asyncio.Event()
        self._milestones.append((count, reached))
        if self.acknowledged >= count:
            reached.set()
        await reached.wait()


async def work_through(workers: list[Worker], total: int, *, within: float) -> None:
    """Run every worker until ``total`` Completes are acknowledged; a worker's failure is raised at once."""
    done = WorkDone(total, within)
    tasks = [asyncio.create_task(worker.work(done)) for worker in workers]
    finished = asyncio.create_task(done.event.wait())
    try:
        await asyncio.wait([finished, *tasks], timeout=within, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()  # the worker's assertion, with what it got
        assert finished.done(), f"{done.acknowledged} of {total} Completes acknowledged within {within} s"
    finally:
        finished.cancel()
        for task in tasks:
            task.cancel()


async def all_items(queues: queue_pb2_grpc.QueueServiceAsyncStub, queue: str) -> list[queue_pb2.Item]:
    """Every item of ``queue``, with its transitions, page by page."""
    items: list[queue_pb2.Item] = []
    token = ""
    while True:
        page = await queues.ListItems(
            queue_pb2.ListItemsRequest(parent=queue, page_size=1000, page_token=token)
        )
        items.extend(page.items)
        if not (token := page.next_page_token):
            return items


class HoldingAgent(ScriptedAgent):
    """A scripted agent that holds its leases until the test completes them."""

    async def assignments_so_far(self) -> list[Assignment]:
        """Every Assignment that arrived before the Ack of a Heartbeat sent now: each one the replica had
        decided to send by then (a dispatch pass runs on its event loop's next turn)."""
        await self.settle()
        arrived = [response.assignment for response in self._stash if response.HasField("assignment")]
        self._stash[:] = [response for response in self._stash if not response.HasField("assignment")]
        return arrived


@dataclass
class Violations:
    """What a fault must never cost, as the agents saw it."""

    rejected: list[str] = field(default_factory=list)
    """A Progress or Complete about a lease the agent held, refused."""
    doubly_held: list[str] = field(default_factory=list)
    """An item assigned to one agent while another still held it."""
    lost_verdicts: dict[str, int] = field(default_factory=dict)
    """item -> epoch of a held lease a Welcome did not keep (fine only if that epoch had completed it)."""


@dataclass
class _Held:
    item: str
    epoch: int
    running: bool = False
    """RUNNING acknowledged: the Complete is what is pending."""


@dataclass
class FailoverWorker:
    """An agent that works as :class:`Worker` does and, when its stream ends, opens the next session on
    another live replica, listing the leases it holds; it goes on with those the Welcome keeps. ``live``:
    the replicas' addresses, which the test updates as it kills and starts them."""

    live: list[str]
    address: str
    holders: dict[str, str]
    """item -> the agent that holds it now, shared by every worker of a test."""
    violations: Violations
    agent_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sessions: int = 0
    _held: dict[str, _Held] = field(default_factory=dict)

    @property
    def held(self) -> dict[str, str]:
        """item -> RUNNING or LEASED, for a failure's report."""
        return {state.item: "RUNNING" if state.running else "LEASED" for state in self._held.values()}

    async def work(self, queue: str, capacity: int, done: WorkDone) -> None:
        while True:
            agent = ScriptedAgent(self.address, agent_id=self.agent_id)
            held = {lease: state.epoch for lease, state in self._held.items()}
            await agent.connect([queue], capacity=capacity, held=held, expect_welcome=False)
            first = await agent.next(within=done.within)
            if first.HasField("welcome"):
                self.sessions += 1
                agent.welcome = first.welcome
                for verdict in first.welcome.lease_verdicts:
                    assert verdict.lease_id in self._held, f"a verdict on a lease never listed: {verdict}"
                    if not verdict.kept:
                        self._forget(verdict, done)
                for lease, state in self._held.items():
                    await self._send_next(agent, lease, state)
                async with agent.heartbeating():
                    await self._serve(agent, done)
            await agent.close()
            others = [address for address in self.live if address != self.address]
            self.address = others[0] if others else self.address

    def _forget(self, verdict: queue_pb2.LeaseResponse.LeaseVerdict, done: WorkDone) -> None:
        state = self._held.pop(verdict.lease_id)
        self.violations.lost_verdicts[state.item] = state.epoch
        self.holders.pop(state.item, None)
        if state.running:
            # Its Complete was sent and the Ack lost with the replica: the item ended then (the test checks
            # that it did, at this epoch), and the Welcome of the next session says the lease is gone.
            done.count()

    async def _send_next(self, agent: ScriptedAgent, lease: str, state: _Held) -> None:
        if state.running:
            complete = queue_pb2.LeaseRequest.Complete(lease_id=lease, epoch=state.epoch, outcome=SUCCEEDED)
            await agent.send(complete=complete)
        else:
            progress = queue_pb2.LeaseRequest.Progress(lease_id=lease, epoch=state.epoch, state=RUNNING)
            await agent.send(progress=progress)

    async def _serve(self, agent: ScriptedAgent, done: WorkDone) -> None:
        """Until the stream ends."""
        while True:
            response = await agent.next(within=done.within)
            kind = response.WhichOneof("message")
            if kind is None:
                return
            if kind == "assignment":
                assignment = response.assignment
                item = assignment.item.name
                if self.holders.get(item, self.agent_id) != self.agent_id:
                    self.violations.doubly_held.append(f"{item}: {self.holders[item]} and {self.agent_id}")
                self.holders[item] = self.agent_id
                state = self._held[assignment.lease_id] = _Held(item, assignment.epoch)
                await self._send_next(agent, assignment.lease_id, state)
            elif kind == "ack" and response.ack.lease_id in self._held:
                lease = response.ack.lease_id
                if response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_PROGRESS:
                    self._held[lease].running = True
                    await self._send_next(agent, lease, self._held[lease])
                elif response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_COMPLETE:
                    assert response.ack.state == SUCCEEDED, response
                    self.holders.pop(self._held.pop(lease).item, None)
                    done.count()
            elif kind in ("reject", "revoke", "cancel"):  # none is due to an agent that lost nothing
                lease = getattr(response, kind).lease_id
                state = self._held.pop(lease, _Held("", 0))
                self.holders.pop(state.item, None)
                self.violations.rejected.append(f"{state.item} epoch {state.epoch}: {response}")
