"""The gRPC server every Takeoff service runs on.

It serves the service's own API plus ``grpc.health.v1`` (one status per service, and the overall ``""``)
and server reflection, on one or more addresses (``host:port`` with port 0 allowed, ``unix:/path``),
behind the interceptor chain tracing -> metrics (when served) -> errors -> access control -> request
decoding. Shutdown first reports NOT_SERVING, so load balancers stop sending, then lets in-flight calls
finish within the grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client.registry import Collector

from takeoff_server import reflection
from takeoff_server.access import AccessRules, KeyVerifier, Rule, missing_rules
from takeoff_server.config import TlsSettings
from takeoff_server.interceptors import (
    AccessControl,
    FinishedCalls,
    Handler,
    HandlerInterceptor,
    access_handler,
    decoding_handler,
    error_guard,
    guard_handler,
)
from takeoff_server.metrics import RpcMetrics, measured_handler
from takeoff_server.telemetry import exporting, traced_handler

logger = logging.getLogger(__name__)

CANCELLED_CALLS_PATIENCE_SECONDS = 10.0
"""How long a stop waits for the servicers of calls their callers cancelled (``FinishedCalls``): as long
as a write waits for SQLite's lock."""

ServicerT = TypeVar("ServicerT")


@dataclass(frozen=True, slots=True)
class ServiceBinding:
    """One gRPC service to serve: its full name (``takeoff.v1.QueueService``) and how to add it."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    on_shutdown: Callable[[], Awaitable[None]] | None = None
    """Runs once the server reports NOT_SERVING, before in-flight calls are drained: a service with
    long-lived streams ends them here, so that shutdown does not wait out the whole grace period."""
    main_loop: Callable[[], Coroutine[Any, Any, None]] | None = None
    """Work the process does besides serving (the agent's lease session). It starts once the server
    serves; when it ends, the process shuts down (and exits with its error, if it raised one)."""
    methods: tuple[str, ...] = ()
    """The service's method names, each of which must have a rule in ``access``."""
    access: AccessRules = field(default_factory=dict)
    """Who may call each method (the service's ``access.py``); a method without a rule is refused."""

    def full_rules(self) -> dict[str, Rule]:
        return {f"/{self.name}/{method}": rule for method, rule in self.access.items()}

    @classmethod
    def of(
        cls,
        descriptor: ServiceDescriptor,
        add_servicer: Callable[[ServicerT, grpc.aio.Server], None],
        servicer: ServicerT,
        *,
        access: AccessRules,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        main_loop: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> ServiceBinding:
        """Bind a generated ``add_XxxServicer_to_server`` to a servicer instance, with its access rules."""
        methods = tuple(method.name for method in descriptor.methods)
        if missing := missing_rules(methods, access):
            raise ValueError(f"{descriptor.full_name} states no access rule for {', '.join(missing)}")
        return cls(
            descriptor.full_name,
            lambda server: add_servicer(servicer, server),
            on_shutdown,
            main_loop,
            methods,
            access,
        )


@dataclass(frozen=True, slots=True)
class Wiring:
    """What a service's ``wire`` returns: its bindings, and how its server verifies the keys presented."""

    services: Sequence[ServiceBinding]
    verifier: KeyVerifier
    metrics: Sequence[Collector] = ()
    """The service's own metrics (``takeoff_server.metrics``), served with the RPC metrics."""


class TakeoffServer:
    """A started-on-demand ``grpc.aio`` server with health, reflection and Takeoff's interceptors."""

    def __init__(
        self,
        services: Sequence[ServiceBinding],
        *,
        listen: Sequence[str],
        verifier: KeyVerifier,
        tls: TlsSettings | None = None,
        rpc_metrics: RpcMetrics | None = None,
    ) -> None:
        self.services = tuple(services)
        self._listen = tuple(listen)
        self._tls = tls
        rules = {name: rule for service in self.services for name, rule in service.full_rules().items()}
        self.access = AccessControl(verifier, rules)
        self.health = health.aio.HealthServicer()
        self.addresses: list[str] = []
        self._finished_calls = FinishedCalls()
        exported = exporting()

        def wrap(handler: Handler, method: str) -> Handler:
            # Innermost first: only the servicer runs on when its caller cancels; an undecodable request
            # is a status the error guard sends; the metrics see the status a domain error became.
            handler = self._finished_calls.handler(handler, method)
            handler = decoding_handler(handler, method)
            handler = access_handler(handler, method, self.access)
            handler = guard_handler(handler, method, error_guard)
            if rpc_metrics is not None:
                handler = measured_handler(handler, method, rpc_metrics)
            return handler if exported else traced_handler(handler, method)

        # Spans that are exported get OpenTelemetry's interceptor, with the rpc.* attributes and the status.
        traced = [aio_server_interceptor()] if exported else []  # type: ignore[no-untyped-call]
        self._server = grpc.aio.server(
            # One interceptor for Takeoff's chain: grpc.aio asks every interceptor for every call's handler.
            interceptors=[*traced, HandlerInterceptor(wrap)],
            options=[("grpc.so_reuseport", 0)],
        )
        for service in self.services:
            service.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*(s.name for s in self.services), health.SERVICE_NAME], self._server
        )

    async def start(self) -> list[str]:
        """Bind every address and start serving; returns the addresses with real port numbers."""
        for address in self._listen:
            self.addresses.append(self._bind(address))
        await self._server.start()
        for name in ("", *(s.name for s in self.services)):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s on %s", ", ".join(s.name for s in self.services), ", ".join(self.addresses))
        return list(self.addresses)

    def _bind(self, address: str) -> str:
        if address.startswith("unix:"):
            path = Path(address.removeprefix("unix:").removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # a socket left by a killed predecessor
            self._server.add_insecure_port(f"unix:{path}")
            return f"unix:{path}"
        host, _, _ = address.rpartition(":")
        try:
            if self._tls is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, server_credentials(self._tls))
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or not available")
        return f"{host}:{port}"

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, stop taking calls, give in-flight ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        for service in self.services:
            if service.on_shutdown is not None:
                await service.on_shutdown()
        await self._server.stop(grace)
        await self._finished_calls.settle(CANCELLED_CALLS_PATIENCE_SECONDS)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for address in self.addresses:
            if address.startswith("unix:"):
                Path(address.removeprefix("unix:")).unlink(missing_ok=True)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """The server side of ``tls``: its certificate, and with ``require_client_cert`` the CA callers' must
    chain to."""
    client_ca = tls.ca_file.read_bytes() if tls.require_client_cert and tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def write_ready_file(path: Path, addresses: Sequence[str], metrics_address: str = "") -> None:
    """Publish the bound addresses (and the metrics endpoint's, when it serves) atomically, so a supervisor
    never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    record: dict[str, object] = {"pid": os.getpid(), "addresses": list(addresses)}
    if metrics_address:
        record["metrics_address"] = metrics_address
    partial.write_text(json.dumps(record))
    partial.replace(path)


async def serve_until_signalled(server: TakeoffServer, *, grace: float) -> None:
    """Serve until SIGTERM or SIGINT (or a main loop's failure), then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    main_loops = [asyncio.create_task(s.main_loop()) for s in server.services if s.main_loop is not None]
    for task in main_loops:
        task.add_done_callback(lambda _: stop.set())  # a main loop that ends ends the process
    try:
        await stop.wait()
        logger.info("shutting down (grace %.1fs)", grace)
        await server.stop(grace)
        for task in main_loops:
            task.cancel()
        for outcome in await asyncio.gather(*main_loops, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
