"""A builder served in-process with its parts in reach, for tests that look past the API (retention,
metrics, spans)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from takeoff.v1 import build_pb2_grpc
from takeoff_builder.__main__ import BuilderParts, assemble
from takeoff_builder.settings import BuilderSettings
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.server import TakeoffServer
from tests.builder.conftest import Builder
from tests.keys import ADMIN_KEY


@dataclass
class Served:
    builder: Builder
    parts: BuilderParts


@asynccontextmanager
async def served_builder(settings: BuilderSettings) -> AsyncIterator[Served]:
    async with AsyncExitStack() as resources:
        parts = await assemble(settings, resources)
        wiring = parts.wiring()
        server = TakeoffServer(wiring.services, listen=settings.listen, verifier=wiring.verifier)
        [address] = await server.start()
        try:
            async with open_aio_channel(address, api_key=ADMIN_KEY) as channel:
                yield Served(Builder(address, build_pb2_grpc.BuildServiceStub(channel), settings), parts)
        finally:
            await server.stop(0)
