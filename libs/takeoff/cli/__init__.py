"""The ``takeoff`` command line."""

from __future__ import annotations

from typing import Annotated

import typer

from takeoff.cli import (
    agent_command,
    job_commands,
    keys_commands,
    launch_commands,
    queue_commands,
    run_commands,
    sdk_commands,
    secrets_commands,
    stack_commands,
)
from takeoff.cli._registry import use_key

app = typer.Typer(
    name="takeoff",
    help="Launch machine-learning jobs on queues, and follow their runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="API key to present. Default: TAKEOFF_API_KEY, else TAKEOFF_TOKEN (in a launched job),"
            " else the admin key `takeoff up` wrote to TAKEOFF_HOME/keys/admin.key.",
            show_default=False,
        ),
    ] = None,
) -> None:
    use_key(key)


stack_commands.register(app)
job_commands.register(app)
queue_commands.register(app)
launch_commands.register(app)
run_commands.register(app)
keys_commands.register(app)
secrets_commands.register(app)
sdk_commands.register(app)
app.command()(agent_command.agent)


def main() -> None:
    app()
