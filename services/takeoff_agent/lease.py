"""The agent's end of the Lease stream: Hello, heartbeats, answers by sequence number, reconnects.

One stream per agent session. The link reconnects with backoff whenever the stream ends, sending the
leases the agent still holds in every Hello. Only a Welcome or a heartbeat's Ack renews leases: they are
then good until the Hello's or the heartbeat's send time plus the TTL, less :data:`FENCE_LEAD_SECONDS`,
which the agent and its jobs' fences use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import UnresolvedTarget, open_aio_channel
from takeoff_rpc.status import RpcStatus, decode_rpc_error

logger = logging.getLogger(__name__)

LeaseRequest = queue_pb2.LeaseRequest
LeaseResponse = queue_pb2.LeaseResponse
MAX_RECONNECT_DELAY_SECONDS = 1.0
RECONNECT = RetryPolicy(initial_delay=0.1, max_delay=MAX_RECONNECT_DELAY_SECONDS, deadline=math.inf)
"""Waits after a session ends: full jitter below 0.1 s doubling to 1 s, so that the agents of a restarted
queue service do not all reconnect at once. Only its delays are used (reconnecting never gives up); the
infinite deadline says so to RetryPolicy."""
REFUSED_KEY = RetryPolicy(initial_delay=1.0, max_delay=30.0, deadline=math.inf)
"""Waits after the queue service refused the agent's key (UNAUTHENTICATED, PERMISSION_DENIED): the agent
keeps trying, as an operator may fix the key or its grants, but slowly, one log line each time."""
KEY_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
RESEND = RetryPolicy(initial_delay=0.1, max_delay=5.0, deadline=math.inf)
"""Waits before a message that must arrive (Progress, Complete, Release) goes again after the queue service
did not take it: answered ``Reject{NOT_COMMITTED}`` (its database failed: full, unavailable, a lock timeout;
or other replicas kept changing the item), or its session ended unanswered (older queue services end the
stream with such a message's error). Full jitter below 0.1 s doubling to 5 s, for ever: a failing database
is not hammered, and the session heartbeats meanwhile. A replica that died costs the first wait only, under
0.1 s."""
NOT_COMMITTED = queue_pb2.REJECT_REASON_NOT_COMMITTED
FENCE_LEAD_SECONDS = 1.0
"""How much sooner than the queue service the agent counts its leases lapsed (at most a sixth of the TTL):
a job is stopped before the queue gives its item to the next attempt, so it cannot finish its work once the
queue has taken it for lost (the work would then run twice). A shim looks at the fence as the lease ends
(shim.until_fence_check); the lead is for a loaded machine's delays."""
CHANNEL_OPTIONS = (("grpc.max_reconnect_backoff_ms", 800), ("grpc.use_local_subchannel_pool", 1))
"""While the queue service is away the channel's own back-off paces the connection attempts, and a session
starts as soon as one succeeds: capped at 0.8 s, plus gRPC's 20 % jitter, dispatch resumes within a second
of a restarted service answering (takeoff_rpc's default cap is 2 s). The channel keeps its connections to
itself: by default gRPC shares them between channels to the same address, even past a channel's close, and
the new channel that leaves a silent replica would be handed the old connection to it again."""


class Disconnected(Exception):
    """The stream ended before the server answered; send again once reconnected. Its text says how the
    session ended (the queue service's status, when it ended the stream with one)."""


class ServerSilent(Exception):
    """The queue service left a heartbeat unanswered too long: it hangs, or the way to it is cut without
    the connection breaking (which gRPC's keepalive would notice only after minutes)."""


class SessionRefused(Exception):
    """The queue service will not take this agent (an unknown queue, an unsupported resource kind)."""


@dataclass(frozen=True, slots=True)
class HelloSpec:
    agent_id: str
    display_name: str
    queues: list[str]
    resources: list[common_pb2.ResourceKind.ValueType]
    capacity: int
    version: str


class LeaseHandler(Protocol):
    def held_leases(self) -> dict[str, int]: ...
    def draining(self) -> bool: ...
    async def on_welcome(self, welcome: LeaseResponse.Welcome) -> None: ...
    async def on_assignment(self, assignment: LeaseResponse.Assignment) -> None: ...
    async def on_cancel(self, cancel: LeaseResponse.Cancel) -> None: ...
    async def on_revoke(self, revoke: LeaseResponse.Revoke) -> None: ...
    def on_renewed(self, until: float) -> None: ...


class LeaseLink:
    def __init__(
        self,
        address: str,
        hello: HelloSpec,
        handler: LeaseHandler,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``api_key``: the agent's own key, presented on the stream; ``credentials``: TLS to the queue."""
        self._address = address
        self._api_key = api_key
        self._credentials = credentials
        self._hello = hello
        self._handler = handler
        self.capacity = hello.capacity
        """What the agent offers the queue now: ``hello.capacity``, or 0 while it cannot do the work."""
        self._outgoing: asyncio.Queue[LeaseRequest | None] | None = None
        self._answers: dict[int, asyncio.Future[LeaseResponse]] = {}
        self._sequence = itertools.count(1)
        self._connected = asyncio.Event()
        self.session_id = ""
        self.lease_ttl = 30.0
        self.heartbeat_interval = 10.0
        self._hello_sent = 0.0
        self.last_heartbeat_ack: float | None = None
        self._stopped = asyncio.Event()
        self._failed_sessions = self._refusals = 0
        """Sessions ended before their Welcome, and refusals of the key, since the last Welcome."""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def run(self) -> None:
        """Hold a session open until ``stop()``, reconnecting with backoff.

        A queue address may list several replicas (``host:port,host:port``, takeoff_rpc.channels): the
        channel's pick_first policy connects to the first one that answers, and when a session ends because
        its replica died the next one goes to the first still up. A replica that went silent (hung, or its
        host cut off, so no connection breaks) is left on a new channel, as the old one's connection still
        leads to it."""
        while not self._stopped.is_set():
            try:
                channel = open_aio_channel(
                    self._address,
                    api_key=self._api_key,
                    credentials=self._credentials,
                    options=CHANNEL_OPTIONS,
                )
            except UnresolvedTarget as error:  # a name of the list, resolved again for the new channel
                self._failed_sessions += 1
                logger.warning("%s; trying again", error)
                await self._pause(RECONNECT.delay(self._failed_sessions))
                continue
            async with channel:
                await self._sessions(channel)

    async def _sessions(self, channel: grpc.aio.Channel) -> None:
        """Sessions on ``channel`` until ``stop()``, or until one ends with its server silent."""
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        while await self._until_connected(channel):
            refused: grpc.aio.AioRpcError | None = None
            silent = False
            ended = "the stream ended"
            try:
                await self._session(stub)
            except ServerSilent as error:
                logger.warning("%s; reconnecting on a new connection", error)
                silent = True
                ended = str(error)
            except grpc.aio.AioRpcError as error:
                status = decode_rpc_error(error, target=self._address)
                if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise SessionRefused(error.details() or error.code().name) from None
                # Only SESSION_SUPERSEDED means another process took the agent's id; an ABORTED message
                # (CONCURRENT_CHANGE: other replicas kept changing its item) is sent again like any other.
                if status.reason == "SESSION_SUPERSEDED":
                    logger.error("another process with this agent's id took over its session; stopping")
                    raise SessionRefused(error.details() or "superseded") from None
                if error.code() in KEY_REFUSALS:
                    refused = error
                else:
                    ended = f"the queue service ended it: {_status_text(status)}"
                    logger.warning("lease stream ended (%s); reconnecting", ended)
            finally:
                # A session that got as far as Welcome starts the back-off over.
                if self._connected.is_set():
                    self._failed_sessions = self._refusals = 0
                else:
                    self._failed_sessions += 1
                self._connected.clear()
                for answer in self._answers.values():
                    if not answer.done():
                        answer.set_exception(Disconnected(ended))
                self._answers.clear()
            if self._stopped.is_set():
                continue
            if refused is not None:  # kept trying, slowly: an operator may fix the key
                self._refusals += 1
                delay = REFUSED_KEY.delay(self._refusals)
                self._log_refusal(refused, delay)
            else:
                delay = RECONNECT.delay(max(self._failed_sessions, 1))
            await self._pause(delay)
            if silent:
                return

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` before the next session, or until ``stop()``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def _log_refusal(self, error: grpc.aio.AioRpcError, delay: float) -> None:
        """One line per refused session, naming the reason (the key's name at most, never its secret)."""
        status = decode_rpc_error(error, target=self._address)
        logger.error(
            "the queue service at %s refused this agent's API key (%s %s): %s; check the agent's api_key "
            "(TAKEOFF_API_KEY or api_key_file) and the queues it may lease; trying again in %.0fs",
            self._address,
            status.code.name,
            status.reason,
            status.message,
            delay,
        )

    async def _until_connected(self, channel: grpc.aio.Channel) -> bool:
        """Wait until the channel to the queue service is connected (True) or ``stop()`` is called (False).

        The channel's own back-off (:data:`CHANNEL_OPTIONS`) paces the connection attempts while the service
        is away, and the session starts as soon as one succeeds."""
        ready = asyncio.ensure_future(channel.channel_ready())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        return not self._stopped.is_set()

    async def _session(self, stub: queue_pb2_grpc.QueueServiceAsyncStub) -> None:
        self.session_id = uuid.uuid4().hex
        outgoing: asyncio.Queue[LeaseRequest | None] = asyncio.Queue()
        self._outgoing = outgoing
        held = self._handler.held_leases()
        self._hello_sent = time.time()  # the queue renews what it keeps later than this
        await outgoing.put(
            LeaseRequest(
                hello=LeaseRequest.Hello(
                    agent_id=self._hello.agent_id,
                    session_id=self.session_id,
                    display_name=self._hello.display_name,
                    queues=self._hello.queues,
                    resources=self._hello.resources,
                    capacity=self.capacity,
                    held_leases=[LeaseRequest.HeldLease(lease_id=k, epoch=v) for k, v in held.items()],
                    version=self._hello.version,
                    draining=self._handler.draining(),
                )
            )
        )

        async def requests() -> AsyncIterator[LeaseRequest]:
            while (request := await outgoing.get()) is not None:
                yield request

        call = stub.Lease(requests())
        heartbeats: asyncio.Task[ServerSilent | None] | None = None
        try:
            async for response in call:
                heartbeats = heartbeats or asyncio.create_task(self._heartbeat(call))
                await self._receive(response)
        except asyncio.CancelledError:
            # The heartbeat cancelled the call (its answer never came); a cancel of this task goes on.
            task = asyncio.current_task()
            silence = heartbeats.result() if heartbeats is not None and heartbeats.done() else None
            if silence is None or (task is not None and task.cancelling()):
                raise
            raise silence from None
        finally:
            await outgoing.put(None)
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats

    async def _receive(self, response: LeaseResponse) -> None:
        match response.WhichOneof("message"):
            case "welcome":
                welcome = response.welcome
                self.lease_ttl = welcome.lease_ttl.ToTimedelta().total_seconds() or self.lease_ttl
                self.heartbeat_interval = (
                    welcome.heartbeat_interval.ToTimedelta().total_seconds() or self.heartbeat_interval
                )
                self._handler.on_renewed(self._renewed_until(self._hello_sent))  # what the Welcome keeps
                self._connected.set()
                await self._handler.on_welcome(welcome)
            case "assignment":
                await self._handler.on_assignment(response.assignment)
            case "cancel":
                await self._handler.on_cancel(response.cancel)
            case "revoke":
                await self._handler.on_revoke(response.revoke)
            case "ack" | "reject":
                answer = response.ack if response.HasField("ack") else response.reject
                future = self._answers.pop(answer.request_sequence, None)
                if future is not None and not future.done():
                    future.set_result(response)

    async def _heartbeat(
        self, call: grpc.aio.StreamStreamCall[LeaseRequest, LeaseResponse]
    ) -> ServerSilent | None:
        """Heartbeat every interval until the session ends. A heartbeat unanswered for a third of the TTL
        (at least an interval) cancels ``call`` and returns why: the leases were renewed at most an interval
        before it was sent, so TTL - interval - that patience (10 s by default) is left to reach another
        replica, whose Welcome keeps them. A busy server's late answer costs a reconnect, not a lease."""
        patience = max(self.heartbeat_interval, self.lease_ttl / 3)
        while True:
            sent = time.time()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that comes as the
                # answer arrives, and this task, cancelled as its session ends, would outlive it.
                async with asyncio.timeout(patience):
                    answer = await self.send(heartbeat=LeaseRequest.Heartbeat())
            except Disconnected:
                return None
            except TimeoutError:
                call.cancel()
                return ServerSilent(
                    f"the queue service at {self._address} answered no heartbeat in {patience:g}s"
                )
            if answer.HasField("ack"):
                self.last_heartbeat_ack = time.time()
                self._handler.on_renewed(self._renewed_until(sent))
            await asyncio.sleep(self.heartbeat_interval)

    def _renewed_until(self, sent: float) -> float:
        return sent + self.lease_ttl - min(FENCE_LEAD_SECONDS, self.lease_ttl / 6)  # short test TTLs

    async def send(self, **message: Any) -> LeaseResponse:
        """Send one message and wait for its Ack or Reject; raises Disconnected if the stream ends first."""
        if not self.connected:
            await self._connected.wait()
        assert self._outgoing is not None
        sequence = next(self._sequence)
        future: asyncio.Future[LeaseResponse] = asyncio.get_running_loop().create_future()
        self._answers[sequence] = future
        await self._outgoing.put(LeaseRequest(sequence=sequence, **message))
        return await future

    async def send_until_answered(self, **message: Any) -> LeaseResponse:
        """Send until the queue service takes the message (for idempotent messages): one it did not commit
        (``Reject{NOT_COMMITTED}``: nothing changed) or whose session ended first is kept and sent again
        after a wait of :data:`RESEND`, in this session or the next. Returns its Ack, or a Reject that
        decides (the lease is lost, the transition refused)."""
        tries = 0
        while True:
            try:
                answer = await self.send(**message)
            except Disconnected as error:
                why = str(error)
            else:
                if not (answer.HasField("reject") and answer.reject.reason == NOT_COMMITTED):
                    return answer
                why = answer.reject.message
            tries += 1
            delay = RESEND.delay(tries)
            logger.warning(
                "the queue service did not take %s (%s); sending it again in %.1fs",
                _described(message),
                why,
                delay,
            )
            await self._pause(delay)

    def set_capacity(self, capacity: int) -> None:
        """Offer the queue ``capacity`` from now on: in this session at once (SetCapacity, sent after
        whatever is queued before it), else in the next session's Hello. Lowering it ends no work."""
        if capacity == self.capacity:
            return
        self.capacity = capacity
        if self._outgoing is not None:
            self._outgoing.put_nowait(LeaseRequest(set_capacity=LeaseRequest.SetCapacity(capacity=capacity)))

    def stop(self) -> None:
        self._stopped.set()
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)


def _status_text(status: RpcStatus) -> str:
    """``INTERNAL: internal error; ... request id X`` (the reason too when it says more than the code)."""
    code = status.code.name
    reason = f" {status.reason}" if status.reason != code else ""
    return f"{code}{reason}: {status.message}"


def _described(message: dict[str, Any]) -> str:
    """``the Complete of lease L`` for send()'s keyword arguments."""
    ((kind, body),) = message.items()
    lease_id = getattr(body, "lease_id", "")
    name = kind.replace("_", " ").title().replace(" ", "")
    return f"the {name} of lease {lease_id}" if lease_id else f"the {name}"
