"""``python -m takeoff_console``: serve the console until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn

from takeoff._auth import admin_key_path
from takeoff.stack import read_secret_file
from takeoff_console.app import create_app
from takeoff_console.client import ServiceChannels
from takeoff_console.sessions import OneTimeCode
from takeoff_console.settings import ConsoleSettings
from takeoff_server.config import ConfigError, load_settings
from takeoff_server.main import EXIT_CONFIG_ERROR, stop_with_parent
from takeoff_server.server import write_ready_file
from takeoff_server.telemetry import setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m takeoff_console")
    parser.add_argument("--config", type=Path, help="YAML settings file (TAKEOFF_* variables win over it)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(ConsoleSettings, args.config)
        signin_code = OneTimeCode.from_file(settings.signin_code_file)
    except (ConfigError, OSError) as error:
        print(f"takeoff-console: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if settings.parent_pid is not None:
        stop_with_parent(settings.parent_pid)
    setup_logging("takeoff-console", settings.log_level, settings.log_format)
    asyncio.run(serve(settings, signin_code))


def admin_key_reader(home: Path) -> Callable[[], str | None]:
    """Reads the stack's admin key when a one-time link is used (so a key made after start is found)."""
    return lambda: read_secret_file(admin_key_path(home))


async def serve(settings: ConsoleSettings, signin_code: OneTimeCode) -> None:
    # Bind first, so that port 0 is known before the app (its Host check and cookie) is made.
    listener = socket.create_server((settings.host, settings.port))
    port = listener.getsockname()[1]
    channels = ServiceChannels.open(settings.registry_address, settings.queue_address, settings.tls_ca_file)
    app = create_app(
        channels,
        port=port,
        allowed=settings.allowed_hosts,
        signin_code=signin_code,
        admin_key=admin_key_reader(settings.home),
        session_seconds=settings.session_hours * 3600,
    )
    tls = settings.tls
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        ssl_certfile=str(tls.cert_file) if tls else None,
        ssl_keyfile=str(tls.key_file) if tls else None,
        proxy_headers=False,
        access_log=False,  # a request line may hold the one-time sign-in code
        server_header=False,
    )

    def started() -> None:
        if settings.ready_file is not None:
            write_ready_file(settings.ready_file, [f"{settings.host}:{port}"])

    await _Server(config, started).serve(sockets=[listener])


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_started`` once it accepts connections (the stack waits for that)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], object]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


if __name__ == "__main__":
    main()
