"""A LeaseHandler (takeoff_agent.lease) for tests that hold a real Lease session without running work."""

from __future__ import annotations

import asyncio

from takeoff.v1 import queue_pb2


class NoLeases:
    """Holds no leases, keeps each Welcome and each deadline the link renewed its leases to; any work the
    queue sends fails the test."""

    def __init__(self) -> None:
        self.welcomes: asyncio.Queue[queue_pb2.LeaseResponse.Welcome] = asyncio.Queue()
        self.deadlines: list[float] = []
        self._renewed = asyncio.Event()

    def held_leases(self) -> dict[str, int]:
        return {}

    def draining(self) -> bool:
        return False

    async def on_welcome(self, welcome: queue_pb2.LeaseResponse.Welcome) -> None:
        self.welcomes.put_nowait(welcome)

    async def on_assignment(self, assignment: queue_pb2.LeaseResponse.Assignment) -> None:
        raise AssertionError(f"nothing was enqueued, yet {assignment.item} was assigned")

    async def on_cancel(self, cancel: queue_pb2.LeaseResponse.Cancel) -> None:
        raise AssertionError(f"nothing was leased, yet {cancel.lease_id} was cancelled")

    async def on_revoke(self, revoke: queue_pb2.LeaseResponse.Revoke) -> None:
        raise AssertionError(f"nothing was leased, yet {revoke.lease_id} was revoked")

    def on_renewed(self, until: float) -> None:
        self.deadlines.append(until)
        self._renewed.set()

    async def next(self, within: float = 10.0) -> queue_pb2.LeaseResponse.Welcome:
        """The next Welcome."""
        return await asyncio.wait_for(self.welcomes.get(), within)

    async def renewals(self, count: int, within: float = 10.0) -> list[float]:
        """The deadlines, once the link has renewed its leases ``count`` times."""
        async with asyncio.timeout(within):
            while len(self.deadlines) < count:
                self._renewed.clear()
                await self._renewed.wait()
        return self.deadlines
