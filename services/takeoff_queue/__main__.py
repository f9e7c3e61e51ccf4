"""``python -m takeoff_queue``: serve QueueService."""

from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.registry import Collector

from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_queue.access import RULES
from takeoff_queue.api import QueueApi
from takeoff_queue.book import QueueBook
from takeoff_queue.dispatcher import Dispatcher, LeaseTiming
from takeoff_queue.metrics import QueueMetrics
from takeoff_queue.registry_client import Registry
from takeoff_queue.replicas import ReplicaSync, bound_waits, replica_name
from takeoff_queue.retention import QueueRetention
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueStore
from takeoff_server.access import KeyVerifier
from takeoff_server.config import ConfigError
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.peers import registry_verifier
from takeoff_server.rate_limits import Rate
from takeoff_server.retention import pruning
from takeoff_server.server import ServiceBinding, Wiring


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class QueueService:
    """The queue service's parts, wired and started (tests reach in through these)."""

    store: QueueStore
    dispatcher: Dispatcher
    book: QueueBook
    binding: ServiceBinding
    verifier: KeyVerifier
    """How the queue's server verifies the keys presented to it: the registry's VerifyKey, cached."""
    metrics: list[Collector]
    """The queue's own Prometheus metrics, served beside the RPC metrics."""


async def assemble(settings: QueueSettings, resources: AsyncExitStack) -> QueueService:
    database = await open_service_database(
        "queue",
        settings,
        resources,
        migrations=Path(__file__).with_name("migrations"),
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    if settings.replicas and not (settings.database_url or "").startswith("postgresql"):
        raise ConfigError("replicas: true needs a PostgreSQL database_url (postgresql://...)")
    store = QueueStore(database, replica=replica_name() if settings.replicas else "")
    timing = LeaseTiming(
        ttl=timedelta(seconds=settings.lease_ttl_seconds),
        heartbeat_interval=timedelta(seconds=settings.heartbeat_interval_seconds),
    )
    if settings.replicas:
        bound_waits(database.engine, timing)
        await database.engine.dispose()  # the migration's connections were opened without the bounds
    registry = Registry(settings.registry_address, settings)
    resources.push_async_callback(registry.close)
    metrics = QueueMetrics()
    dispatcher = Dispatcher(
        store,
        utc_now,
        timing,
        registry,
        tokens=registry,
        metrics=metrics,
        replicated=settings.replicas,
        pending_window=settings.pending_window or None,
    )
    resources.push_async_callback(dispatcher.stop)
    book = QueueBook(store, dispatcher, registry, utc_now, images_pushed=bool(settings.builder_push_registry))
    await book.start()
    if settings.replicas:
        assert settings.database_url is not None
        replicas = ReplicaSync(settings.database_url, store, dispatcher, book, timing)
        replicas.start()
        resources.push_async_callback(replicas.stop)
    binding = ServiceBinding.of(
        queue_pb2.DESCRIPTOR.services_by_name["QueueService"],
        queue_pb2_grpc.add_QueueServiceServicer_to_server,
        QueueApi(book, dispatcher, Rate(settings.enqueues_per_second, settings.enqueue_burst)),
        access=RULES,
        on_shutdown=dispatcher.stop,
    )
    retention = QueueRetention(settings.retention, store, utc_now)
    await resources.enter_async_context(pruning("queue", retention.prune, settings.retention))
    verifier = registry_verifier(settings, settings.registry_address, resources)
    return QueueService(store, dispatcher, book, binding, verifier, metrics.collectors(lambda: dispatcher))


async def wire(settings: QueueSettings, resources: AsyncExitStack) -> Wiring:
    service = await assemble(settings, resources)
    return Wiring(services=[service.binding], verifier=service.verifier, metrics=service.metrics)


program = ServiceProgram("queue", QueueSettings, wire)

if __name__ == "__main__":
    program.main()
