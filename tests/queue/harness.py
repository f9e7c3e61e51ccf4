"""Real clients for queue tests: a scripted agent on the Lease stream, jobs made in a real registry, and the
queue service in this process for tests that make one item, queue or write fail on purpose."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import struct_pb2

from takeoff.client import Client
from takeoff.models import JobInputs
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_queue.__main__ import QueueService, assemble
from takeoff_queue.model import Item
from takeoff_queue.settings import QueueSettings
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.access import KeyKind, KeyScope, KeyVerifier, Principal, grants_for
from takeoff_server.server import TakeoffServer
from tests.keys import ADMIN_KEY
from tests.postgres import assert_service_wrote_tables

LOCAL_PROCESS = common_pb2.RESOURCE_KIND_LOCAL_PROCESS
PATIENCE = 30.0
"""How long a wait for a message or a state lasts unless a test says otherwise: past one run token mint
that timed out (5 s) and its back-off (up to 10 s), as on a machine whose disk stalls the registry's fsync."""
Response = queue_pb2.LeaseResponse


def keyed_channel(address: str, key: str = ADMIN_KEY) -> grpc.aio.Channel:
    """A channel to a test's service presenting ``key`` (the session's admin key unless told)."""
    return open_aio_channel(address, api_key=key)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def make_code_job(
    registry: str, project: str, job: str, tmp: Path, *, schema: dict[str, Any] | None = None
) -> str:
    """A code job version in the real registry; returns its full version name."""
    code = tmp / f"code-{job}"
    code.mkdir(parents=True, exist_ok=True)
    (code / "train.py").write_text("print('hello')\n")
    with Client(registry, project=project, api_key=ADMIN_KEY) as client:
        created = client.create_job_version(
            job,
            code,
            entrypoint=["python", "train.py"],
            inputs=JobInputs(schema=schema, defaults=None) if schema else None,
        )
    return created.version.name


class ScriptedAgent:
    """An agent that is just a Lease stream: send what the test says, keep what the server sends."""

    def __init__(self, address: str, *, agent_id: str | None = None, key: str = ADMIN_KEY) -> None:
        self.address = address
        self.key = key
        self.agent_id = agent_id or uuid.uuid4().hex
        self.session_id = ""
        """The session of its latest Hello."""
        self.received: asyncio.Queue[queue_pb2.LeaseResponse] = asyncio.Queue()
        self._outgoing: asyncio.Queue[queue_pb2.LeaseRequest | None] = asyncio.Queue()
        self._sequence = 0
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._stash: list[queue_pb2.LeaseResponse] = []
        """Messages that arrived while an answer (Ack or Reject) was awaited, oldest first."""
        self.welcome: Response.Welcome | None = None

    async def connect(
        self,
        queues: list[str],
        *,
        capacity: int = 1,
        held: dict[str, int] | None = None,
        resources: tuple[common_pb2.ResourceKind.ValueType, ...] = (LOCAL_PROCESS,),
        expect_welcome: bool = True,
    ) -> ScriptedAgent:
        self._channel = keyed_channel(self.address, self.key)
        stub = queue_pb2_grpc.QueueServiceStub(self._channel)
        self.session_id = uuid.uuid4().hex
        hello = queue_pb2.LeaseRequest.Hello(
            agent_id=self.agent_id,
            session_id=self.session_id,
            display_name="scripted",
            queues=queues,
            resources=list(resources),
            capacity=capacity,
            held_leases=[
                queue_pb2.LeaseRequest.HeldLease(lease_id=lease, epoch=epoch)
                for lease, epoch in (held or {}).items()
            ],
        )
        await self._outgoing.put(queue_pb2.LeaseRequest(hello=hello))
        self._call = stub.Lease(self._requests())
        self._reader = asyncio.create_task(self._read())
        if expect_welcome:
            self.welcome = (await self.next("welcome")).welcome
        return self

    async def _requests(self) -> Any:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self._call:
                await self.received.put(response)
        except grpc.aio.AioRpcError as error:
            self.error = error
        await self.received.put(Response())  # end marker: no message set

    async def next(self, kind: str | None = None, within: float = PATIENCE) -> queue_pb2.LeaseResponse:
        """The next message (skipping Acks of heartbeats); with ``kind``, it must be of that kind."""
        while True:
            response = (
                self._stash.pop(0) if self._stash else await asyncio.wait_for(self.received.get(), within)
            )
            which = response.WhichOneof("message")
            if which == "ack" and response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_HEARTBEAT and kind != "ack":
                continue
            if kind is not None:
                assert which == kind, f"expected {kind}, got {which}: {response} (stream error: {self.error})"
            return response

    async def answer(self, within: float = PATIENCE) -> queue_pb2.LeaseResponse:
        """The Ack or Reject to the last message sent; whatever else arrives meanwhile is kept for next()."""
        while True:
            response = await asyncio.wait_for(self.received.get(), within)
            which = response.WhichOneof("message")
            if which == "ack" and response.ack.of == queue_pb2.LEASE_MESSAGE_KIND_HEARTBEAT:
                continue
            if which in ("ack", "reject"):
                return response
            self._stash.append(response)

    async def settle(self) -> None:
        """Send a Heartbeat and wait for its Ack: every dispatch pass the server had scheduled before
        reading it has run by then (a pass runs on the event loop's next turn)."""
        sequence = await self.send(heartbeat=queue_pb2.LeaseRequest.Heartbeat())
        while True:
            response = await asyncio.wait_for(self.received.get(), 10)
            if response.WhichOneof("message") == "ack" and response.ack.request_sequence == sequence:
                return
            self._stash.append(response)

    async def send(self, **message: Any) -> int:
        self._sequence += 1
        await self._outgoing.put(queue_pb2.LeaseRequest(sequence=self._sequence, **message))
        return self._sequence

    async def heartbeat(self) -> None:
        await self.send(heartbeat=queue_pb2.LeaseRequest.Heartbeat())

    @asynccontextmanager
    async def heartbeating(self) -> AsyncIterator[None]:
        """Heartbeat every Welcome.heartbeat_interval meanwhile, as a live agent does."""
        assert self.welcome is not None
        interval = self.welcome.heartbeat_interval.ToTimedelta().total_seconds()

        async def beat() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(interval)  # the protocol's pace, not a wait for anything

        beating = asyncio.create_task(beat())
        try:
            yield
        finally:
            beating.cancel()

    async def progress(
        self, assignment: Response.Assignment, state: common_pb2.ItemState.ValueType
    ) -> queue_pb2.LeaseResponse:
        await self.send(
            progress=queue_pb2.LeaseRequest.Progress(
                lease_id=assignment.lease_id, epoch=assignment.epoch, state=state
            )
        )
        return await self.answer()

    async def complete(
        self,
        assignment: Response.Assignment,
        outcome: common_pb2.ItemState.ValueType,
        reason: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED,
        exit_code: int | None = None,
    ) -> queue_pb2.LeaseResponse:
        await self.send(
            complete=queue_pb2.LeaseRequest.Complete(
                lease_id=assignment.lease_id,
                epoch=assignment.epoch,
                outcome=outcome,
                reason=reason,
                exit_code=exit_code,
            )
        )
        return await self.answer()

    async def close(self) -> None:
        await self._outgoing.put(None)
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except TimeoutError:
                self._reader.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def vanish(self) -> None:
        """Drop the connection without a goodbye, as a killed agent would."""
        if self._reader is not None:
            self._reader.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)


async def watch_until(
    queues: queue_pb2_grpc.QueueServiceAsyncStub,
    name: str,
    wanted: Callable[[queue_pb2.Item], bool],
    *,
    within: float = PATIENCE,
) -> queue_pb2.Item:
    """The item as it is once ``wanted`` holds for it, following WatchItem (no polling). A watch refused
    as UNAVAILABLE (the registry that verifies keys is still starting: "retry shortly") is opened again."""
    seen: queue_pb2.Item | None = None
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    async for update in queues.WatchItem(queue_pb2.WatchItemRequest(name=name)):
                        seen = update.item
                        if wanted(seen):
                            return seen
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.1)  # the refusal's "retry shortly"
    except TimeoutError:
        raise AssertionError(f"{name} never got there within {within} s; last seen: {seen}") from None
    raise AssertionError(f"the watch of {name} ended before it got there; last seen: {seen}")


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest field names of a failed call."""
    from google.rpc import error_details_pb2, status_pb2

    reason, fields = "", []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = [v.field for v in bad.field_violations]
    return reason, fields


Stub: TypeAlias = "queue_pb2_grpc.QueueServiceAsyncStub"  # a type only the stubs know


@dataclass
class InProcessQueue:
    parts: QueueService
    address: str
    queues: Stub

    async def new_queue(self) -> str:
        response = await self.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/qtest",
                queue_id=f"q-{uuid.uuid4().hex[:10]}",
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
            )
        )
        return response.queue.name

    async def enqueue(self, queue: str, job: str) -> str:
        return (await self.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job))).item.name

    async def stored(self, name: str) -> queue_pb2.Item:
        return (await self.queues.GetItem(queue_pb2.GetItemRequest(name=name))).item

    def held(self, name: str) -> Item | None:
        """The dispatcher's view of a live item."""
        return self.parts.dispatcher.items.get(name.rsplit("/", 1)[1])


class AdminKeyOnly:
    """Admits the session's admin key without asking a registry: for a test about the queue's own records
    whose registry (which verifies keys) is down on purpose when the queue starts."""

    async def verify(self, secret: str) -> Principal | None:
        if secret != ADMIN_KEY:
            return None
        return Principal("keys/test-admin", "test admin", KeyKind.ADMIN, grants_for(KeyScope(KeyKind.ADMIN)))


@asynccontextmanager
async def in_process_queue(
    settings: QueueSettings, *, verifier: KeyVerifier | None = None
) -> AsyncIterator[InProcessQueue]:
    """The queue service in this process; it verifies keys through its registry unless told otherwise."""
    async with AsyncExitStack() as resources:
        parts = await assemble(settings, resources)
        if settings.database_url:
            assert_service_wrote_tables(settings.database_url, "queue_")  # the PostgreSQL variant runs there
        server = TakeoffServer([parts.binding], listen=settings.listen, verifier=verifier or parts.verifier)
        [address] = await server.start()
        resources.push_async_callback(server.stop, 1)
        admin = await resources.enter_async_context(keyed_channel(address))
        yield InProcessQueue(parts, address, queue_pb2_grpc.QueueServiceStub(admin))


async def agent_shown(queues: Any, agent_id: str) -> queue_pb2.Agent | None:
    """The agent as GetAgent shows it, or None once the queue has forgotten it (AGENT_NOT_FOUND)."""
    try:
        shown: queue_pb2.GetAgentResponse = await queues.GetAgent(
            queue_pb2.GetAgentRequest(name=f"agents/{agent_id}")
        )
        return shown.agent
    except grpc.aio.AioRpcError as error:
        if error_details(error)[0] != "AGENT_NOT_FOUND":
            raise
        return None
