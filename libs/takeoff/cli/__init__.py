"""The ``takeoff`` command line."""

from __future__ import annotations

import typer

from takeoff.cli import (
    agent_command,
    job_commands,
    launch_commands,
    queue_commands,
    run_commands,
    sdk_commands,
    stack_commands,
)

app = typer.Typer(
    name="takeoff",
    help="Launch machine-learning jobs on queues, and follow their runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stack_commands.register(app)
job_commands.register(app)
queue_commands.register(app)
launch_commands.register(app)
run_commands.register(app)
sdk_commands.register(app)
app.command()(agent_command.agent)


def main() -> None:
    app()
