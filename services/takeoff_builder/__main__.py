"""``python -m takeoff_builder``: serve BuildService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from takeoff.v1 import build_pb2, build_pb2_grpc
from takeoff_builder.api import BuildApi
from takeoff_builder.settings import BuilderSettings
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: BuilderSettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    await open_service_database(
        "builder", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    return [
        ServiceBinding.of(
            build_pb2.DESCRIPTOR.services_by_name["BuildService"],
            build_pb2_grpc.add_BuildServiceServicer_to_server,
            BuildApi(),  # type: ignore[abstract]
        )
    ]


program = ServiceProgram("builder", BuilderSettings, wire)

if __name__ == "__main__":
    program.main()
