"""``takeoff agent``: run an agent in the foreground for some queues (``python -m takeoff_agent``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from takeoff._auth import admin_key_path
from takeoff._home import service_address, takeoff_home
from takeoff._stack_file import StackRecord
from takeoff.cli._output import fail
from takeoff.cli._registry import ProjectOption, cli_key
from takeoff.stack import agent_defaults, config_gives


def _local_registry_socket(registry: str) -> str | None:
    """The Unix socket of the registry at ``registry`` when it is the running local stack's (jobs in
    containers reach it through that socket, mounted)."""
    record = StackRecord.read(takeoff_home())
    running = record.services.get("registry") if record is not None else None
    if running is None or running.address != registry:
        return None
    return next((address for address in running.addresses if address.startswith("unix:")), None)


def agent(
    *,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config-file",
            "--config",
            metavar="FILE",
            help="agent.yaml (flags and TAKEOFF_* variables win over it).",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            metavar="QUEUE",
            help="Queue to serve (repeat for several): an id in the project, or projects/P/queues/Q.",
            show_default=False,
        ),
    ] = None,
    max_jobs: Annotated[
        int | None,
        typer.Option("--max-jobs", "-j", min=1, metavar="N", help="Items worked on at once (default 1)."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Name shown in `takeoff agents` (default: the host name)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            file_okay=False,
            help="Where it keeps its id and its jobs' state (default: TAKEOFF_HOME/agent; while another"
            " agent holds that, the first free DIR/2, DIR/3, ...).",
            show_default=False,
        ),
    ] = None,
    project: ProjectOption = None,
) -> None:
    """Serve queues from this machine until Ctrl-C (which drains: running jobs finish, then it exits).

    The agent presents the CLI's key (--key, else TAKEOFF_API_KEY, else the admin
    key in TAKEOFF_HOME/keys/admin.key) unless its agent.yaml gives api_key or
    api_key_file; an agent key (`takeoff keys create --kind agent`) is the least
    it needs.
    """
    if config is not None and not config.is_file():
        fail(f"agent config {config} does not exist")
    if not (queue or os.environ.get("TAKEOFF_QUEUES") or config_gives(config, {"queues"})):
        fail("no queue to serve: give --queue QUEUE (repeatable), or queues in the --config-file", 2)
    env = dict(os.environ)
    for service in ("queue", "builder", "registry"):
        env.setdefault(f"TAKEOFF_{service.upper()}_ADDRESS", service_address(service))
    if queue:
        env["TAKEOFF_QUEUES"] = json.dumps(queue)
    if max_jobs is not None:
        env["TAKEOFF_MAX_JOBS"] = str(max_jobs)
    if name is not None:
        env["TAKEOFF_NAME"] = name
    if state_dir is not None:
        env["TAKEOFF_STATE_DIR"] = str(state_dir)
    if project is not None:
        env["TAKEOFF_PROJECT"] = project
    env.setdefault("TAKEOFF_LISTEN", '["127.0.0.1:0"]')
    found = cli_key()
    if found is not None and not config_gives(config, {"api_key", "api_key_file"}):
        if found.source == str(admin_key_path()):
            env.pop("TAKEOFF_API_KEY", None)  # (not set, or it would have been found first)
            env.setdefault("TAKEOFF_API_KEY_FILE", found.source)
        else:
            env["TAKEOFF_API_KEY"] = found.secret
    env.update(agent_defaults(config, _local_registry_socket(env["TAKEOFF_REGISTRY_ADDRESS"])))
    argv = [sys.executable, "-m", "takeoff_agent", *(["--config", str(config)] if config else [])]
    os.execve(sys.executable, argv, env)
