"""Whether the builder and the registry answer the agent, and the capacity it offers the queue meanwhile.

An agent that cannot reach the services an attempt needs would only hold work it cannot do, so while one of
them is unreachable it offers the queue no capacity (docs/design.md §5, §16) and the queue dispatches to
other agents. The agent's calls say when a service stopped answering (a call failed UNAVAILABLE at the
transport) and when it answered again; while any is unreachable, a ``grpc.health.v1`` Check on the same
channel probes it every :data:`PROBE_INTERVAL_SECONDS`, so capacity comes back even when no call is waiting.
Nothing is probed while every service answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from takeoff_rpc.retries import TRANSIENT_CODES
from takeoff_rpc.status import decode_rpc_error, status_code

logger = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 1.0
"""Between health probes of an unreachable service: capacity returns within about this long of it
answering again, at the cost of one small call per second while it is away."""


def unreachable(error: grpc.RpcError) -> bool:
    """Whether ``error`` says the service could not be reached (UNAVAILABLE without a Takeoff reason), as
    opposed to a service that answered, if only with ``DEPENDENCY_UNAVAILABLE`` about a service behind it."""
    code = status_code(error)
    return code is grpc.StatusCode.UNAVAILABLE and decode_rpc_error(error).reason == code.name


class Peer:
    """One service the agent calls, as its calls and probes find it."""

    def __init__(self, name: str, channel: grpc.aio.Channel, service: str, monitor: Reachability) -> None:
        self.name = name
        self.reachable = True
        self._service = service
        self._health = health_pb2_grpc.HealthStub(channel)
        self._monitor = monitor

    def failed(self, error: grpc.RpcError) -> None:
        """A call to the service failed with ``error``; only an unreachable service changes anything."""
        if unreachable(error):
            self._monitor.mark(self, reachable=False)

    def answered(self) -> None:
        """A call to the service got an answer (a reply or an error the service itself sent)."""
        self._monitor.mark(self, reachable=True)

    async def probe(self) -> bool:
        """Whether the service answers a health Check. A server that answers without knowing the service's
        name, or without a health service, is reachable; one shutting down (NOT_SERVING) is not."""
        request = health_pb2.HealthCheckRequest(service=self._service)
        try:
            reply = await self._health.Check(request, timeout=PROBE_INTERVAL_SECONDS)
        except grpc.aio.AioRpcError as error:
            return error.code() not in TRANSIENT_CODES
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class Reachability:
    """Every service the agent's work needs; ``on_change(True)`` once all answer again after one did not,
    ``on_change(False)`` when one stops answering."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change
        self._peers: list[Peer] = []
        self._prober: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        return all(peer.reachable for peer in self._peers)

    def watch(self, name: str, channel: grpc.aio.Channel, service: str) -> Peer:
        """Follow the service ``service`` (its full gRPC name) that ``channel`` reaches."""
        peer = Peer(name, channel, service, self)
        self._peers.append(peer)
        return peer

    def mark(self, peer: Peer, *, reachable: bool) -> None:
        if peer.reachable == reachable:
            return
        before = self.reachable
        peer.reachable = reachable
        if reachable:
            logger.info("the %s answers again", peer.name)
        else:
            logger.warning("the %s is unreachable: taking no new work until it answers", peer.name)
            if self._prober is None or self._prober.done():
                self._prober = asyncio.get_running_loop().create_task(self._probe_until_reachable())
        if self.reachable != before:
            self._on_change(self.reachable)

    async def _probe_until_reachable(self) -> None:
        while not self.reachable:
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            for peer in [peer for peer in self._peers if not peer.reachable]:
                if await peer.probe():
                    self.mark(peer, reachable=True)

    async def close(self) -> None:
        """Stop probing; call before closing the channels it probes."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
