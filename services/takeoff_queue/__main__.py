"""``python -m takeoff_queue``: serve QueueService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_queue.api import QueueApi
from takeoff_queue.book import QueueBook
from takeoff_queue.dispatcher import Dispatcher, LeaseTiming
from takeoff_queue.registry_client import Registry
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueStore
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class QueueService:
    """The queue service's parts, wired and started (tests reach in through these)."""

    store: QueueStore
    dispatcher: Dispatcher
    book: QueueBook
    binding: ServiceBinding


async def assemble(settings: QueueSettings, resources: AsyncExitStack) -> QueueService:
    database = await open_service_database(
        "queue", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    store = QueueStore(database)
    timing = LeaseTiming(
        ttl=timedelta(seconds=settings.lease_ttl_seconds),
        heartbeat_interval=timedelta(seconds=settings.heartbeat_interval_seconds),
    )
    registry = Registry(settings.registry_address)
    resources.push_async_callback(registry.close)
    dispatcher = Dispatcher(store, utc_now, timing, registry)
    resources.push_async_callback(dispatcher.stop)
    book = QueueBook(store, dispatcher, registry, utc_now, images_pushed=bool(settings.builder_push_registry))
    await book.start()
    binding = ServiceBinding.of(
        queue_pb2.DESCRIPTOR.services_by_name["QueueService"],
        queue_pb2_grpc.add_QueueServiceServicer_to_server,
        QueueApi(book, dispatcher),
        on_shutdown=dispatcher.stop,
    )
    return QueueService(store, dispatcher, book, binding)


async def wire(settings: QueueSettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    return [(await assemble(settings, resources)).binding]


program = ServiceProgram("queue", QueueSettings, wire)

if __name__ == "__main__":
    program.main()
