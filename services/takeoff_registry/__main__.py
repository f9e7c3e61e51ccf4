"""``python -m takeoff_registry``: serve JobService and RunService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_registry.api import JobApi, RunApi
from takeoff_registry.settings import RegistrySettings
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: RegistrySettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    await open_service_database(
        "registry", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    return [
        ServiceBinding.of(
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            JobApi(),  # type: ignore[abstract]
        ),
        ServiceBinding.of(
            runs_pb2.DESCRIPTOR.services_by_name["RunService"],
            runs_pb2_grpc.add_RunServiceServicer_to_server,
            RunApi(),  # type: ignore[abstract]
        ),
    ]


program = ServiceProgram("registry", RegistrySettings, wire)

if __name__ == "__main__":
    program.main()
