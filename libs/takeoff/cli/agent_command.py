"""``takeoff agent``: run an agent in the foreground for some queues (``python -m takeoff_agent``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from takeoff._home import service_address
from takeoff.cli._output import fail


def agent(
    config: Annotated[
        Path | None, typer.Option(help="agent.yaml (flags and TAKEOFF_* variables win over it).")
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="Queue to serve (repeat for several): Q or projects/P/queues/Q."),
    ] = None,
    max_jobs: Annotated[int | None, typer.Option(help="Items worked on at once.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Name shown in `takeoff agents` (default: the host name).")
    ] = None,
) -> None:
    """Serve queues from this machine until Ctrl-C (which drains: running jobs finish, then it exits)."""
    if config is not None and not config.is_file():
        fail(f"agent config {config} does not exist")
    env = dict(os.environ)
    for service in ("queue", "builder", "registry"):
        env.setdefault(f"TAKEOFF_{service.upper()}_ADDRESS", service_address(service))
    if queue:
        env["TAKEOFF_QUEUES"] = json.dumps(queue)
    if max_jobs is not None:
        env["TAKEOFF_MAX_JOBS"] = str(max_jobs)
    if name is not None:
        env["TAKEOFF_NAME"] = name
    env.setdefault("TAKEOFF_LISTEN", '["127.0.0.1:0"]')
    argv = [sys.executable, "-m", "takeoff_agent", *(["--config", str(config)] if config else [])]
    os.execve(sys.executable, argv, env)
