"""``python -m takeoff_<service>``: load settings, set up logging and tracing, serve until signalled."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NoReturn

from takeoff_server.config import ConfigError, SettingsT, load_settings
from takeoff_server.errors import ServiceFailed
from takeoff_server.metrics import MetricsEndpoint, RpcMetrics, process_registry
from takeoff_server.pagination import load_signing_key, use_signing_key
from takeoff_server.server import TakeoffServer, Wiring, serve_until_signalled, write_ready_file
from takeoff_server.telemetry import setup_logging, setup_tracing

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

EXIT_CONFIG_ERROR = 2
EXIT_START_FAILED = 1

YOUNG_COLLECTION_THRESHOLD = 10_000
"""Allocations between the collector's young-generation passes (Python's default: 700)."""


def settle_heap() -> None:
    """Once wired, before serving: what start-up made (modules, the dispatch index a queue loaded) is moved
    out of the collector's sight, and young collections run less often. A service's full collections
    otherwise walked those objects again and again: at the default settings the queue spent about 70 µs
    of every item's life cycle collecting, 8 µs after this (docs/design.md §2)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


PAGE_TOKEN_KEY_FILE = "page-token.key"
"""Under the home directory: signs page tokens, so that they survive a restart of the server."""


def stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when ``parent_pid`` (our parent) exits, however it exits."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        sys.exit(0)


@dataclass(frozen=True)
class ServiceProgram(Generic[SettingsT]):
    """How one service process is put together.

    ``wire`` builds the servicers from the settings; what it opens (databases, clients) it registers on
    the exit stack, which is closed after the server has stopped.
    """

    name: str
    settings: type[SettingsT]
    wire: Callable[[SettingsT, AsyncExitStack], Awaitable[Wiring]]

    def main(self, argv: Sequence[str] | None = None) -> NoReturn:
        parser = argparse.ArgumentParser(prog=f"python -m takeoff_{self.name}")
        parser.add_argument(
            "--config", type=Path, help="YAML settings file (TAKEOFF_* variables win over it)"
        )
        args = parser.parse_args(argv)
        try:
            settings = load_settings(self.settings, args.config)
        except ConfigError as error:
            print(f"takeoff-{self.name}: {error}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        if settings.parent_pid is not None:
            stop_with_parent(settings.parent_pid)
        setup_logging(f"takeoff-{self.name}", settings.log_level, settings.log_format)
        try:
            flush_spans = setup_tracing(f"takeoff-{self.name}")
        except ConfigError as error:
            print(f"takeoff-{self.name}: {error}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        try:
            asyncio.run(self._serve(settings))
        except ConfigError as error:  # found while wiring: a key file that cannot be read, say
            print(f"takeoff-{self.name}: {error}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        except (OSError, ServiceFailed) as error:
            print(f"takeoff-{self.name}: {error}", file=sys.stderr)
            sys.exit(EXIT_START_FAILED)
        finally:
            flush_spans()
        sys.exit(0)

    async def _serve(self, settings: SettingsT) -> None:
        use_signing_key(load_signing_key(settings.page_token_key_file or settings.home / PAGE_TOKEN_KEY_FILE))
        async with AsyncExitStack() as resources:
            wiring = await self.wire(settings, resources)
            rpc_metrics = RpcMetrics() if settings.metrics_listen else None
            server = TakeoffServer(
                wiring.services,
                listen=settings.listen,
                verifier=wiring.verifier,
                tls=settings.tls,
                rpc_metrics=rpc_metrics,
            )
            metrics_address = ""
            if rpc_metrics is not None and settings.metrics_listen:
                registry = process_registry([*rpc_metrics.collectors, *wiring.metrics])
                endpoint = MetricsEndpoint(registry, settings.metrics_listen, wiring.metrics)
                metrics_address = await endpoint.start()
                resources.push_async_callback(endpoint.stop)
            settle_heap()
            addresses = await server.start()
            if settings.ready_file is not None:
                write_ready_file(settings.ready_file, addresses, metrics_address)
            await serve_until_signalled(server, grace=settings.shutdown_grace_seconds)
        logger.info("stopped")
