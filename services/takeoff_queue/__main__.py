"""``python -m takeoff_queue``: serve QueueService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_queue.api import QueueApi
from takeoff_queue.settings import QueueSettings
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: QueueSettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    await open_service_database(
        "queue", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    return [
        ServiceBinding.of(
            queue_pb2.DESCRIPTOR.services_by_name["QueueService"],
            queue_pb2_grpc.add_QueueServiceServicer_to_server,
            QueueApi(),  # type: ignore[abstract]
        )
    ]


program = ServiceProgram("queue", QueueSettings, wire)

if __name__ == "__main__":
    program.main()
