"""Server reflection, both versions: ``grpc.reflection.v1`` and the older ``grpc.reflection.v1alpha``.

Clients differ in the one they ask for: newer gRPC libraries and tools ask for v1, older ones (grpcurl 1.8
included) only for v1alpha.
grpcio-reflection implements only v1alpha. The two protos define the same messages with the same field
numbers, so v1 is answered by grpcio-reflection's v1alpha servicer, each message re-read as the other
version; the v1 stubs are generated from the vendored protos/grpc/reflection/v1/reflection.proto.
Both also find the file of a method, which ``grpcurl describe takeoff.v1.QueueService.Enqueue`` asks for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from takeoff_server._vendor.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from takeoff_server._vendor.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc
from takeoff_server.interceptors import Context

V1_SERVICE_NAME = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
SERVICE_NAMES = (V1_SERVICE_NAME, v1alpha.SERVICE_NAME)


class _MethodFindingPool:
    """The default descriptor pool, whose lookup by symbol also finds methods (protobuf's finds only
    types, fields, enum values and services). The reflection servicers call only its ``Find*`` methods."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return self._pool.FindMethodByName(symbol).containing_service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class ReflectionV1Servicer(v1_pb2_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1.ServerReflection``, answered by grpcio-reflection's v1alpha servicer."""

    def __init__(self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool) -> None:
        self._v1alpha = v1alpha.aio.ReflectionServicer(service_names, pool=pool)

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[v1_pb2.ServerReflectionRequest], context: Context
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        # An async generator, which typeshed's stub mistypes as a coroutine.
        responses = cast(
            AsyncIterator[v1alpha_pb2.ServerReflectionResponse],
            self._v1alpha.ServerReflectionInfo(as_v1alpha(), context),
        )
        async for response in responses:
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha, listing ``service_names`` and both reflection services."""
    listed = [*service_names, *SERVICE_NAMES]
    pool = cast(descriptor_pool.DescriptorPool, _MethodFindingPool())
    v1alpha.enable_server_reflection(listed, server, pool)
    v1_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionV1Servicer(listed, pool), server)
