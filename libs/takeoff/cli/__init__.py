"""The ``takeoff`` command line."""

from __future__ import annotations

from typing import Annotated

import typer
import typer.main
from typer._click.core import Command
from typer.core import TyperArgument, TyperOption

from takeoff import __version__
from takeoff.cli import (
    agent_command,
    artifact_commands,
    job_commands,
    keys_commands,
    launch_commands,
    queue_commands,
    run_commands,
    sdk_commands,
    secrets_commands,
    stack_commands,
    sync_command,
)
from takeoff.cli._registry import use_key

app = typer.Typer(
    name="takeoff",
    help="Launch machine-learning jobs on queues, and follow their runs.",
    epilog="Exit codes: 0 done; 1 the service or the job failed (the error says why); 2 the command was"
    " called wrongly (usage). `takeoff launch --wait` also exits 3 for a cancelled item.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"takeoff {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="API key to present. Default: TAKEOFF_API_KEY, else TAKEOFF_TOKEN (in a launched job),"
            " else the admin key `takeoff up` wrote to TAKEOFF_HOME/keys/admin.key.",
            metavar="KEY",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print takeoff's version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    use_key(key)


stack_commands.register(app)
job_commands.register(app)
queue_commands.register(app)
launch_commands.register(app)
run_commands.register(app)
artifact_commands.register(app)
keys_commands.register(app)
secrets_commands.register(app)
sdk_commands.register(app)
app.command()(agent_command.agent)
app.command()(sync_command.sync)


def main() -> None:
    command = typer.main.get_command(app)
    _name_values(command)
    command()


def _name_values(command: Command) -> None:
    """Help shows what to type, as argparse does (``--project PROJECT``, ``--tail N``, ``--config FILE``),
    where typer would show Python types (``<str>``, ``<int>``, and ``<bool>`` after every flag)."""
    for param in [*command.params, command.get_help_option(typer.Context(command))]:
        if isinstance(param, TyperOption | TyperArgument) and param.metavar is None:
            param.metavar = _value_name(param)
        if isinstance(param, TyperArgument):
            # Its name says what to type already; typer would add the Python type (``RUN <str>``).
            param.display_type_rich = _no_type  # type: ignore[method-assign,assignment]
    for subcommand in getattr(command, "commands", {}).values():
        _name_values(subcommand)


def _no_type(ctx: typer.Context) -> None:
    return None


def _value_name(param: TyperOption | TyperArgument) -> str | None:
    if isinstance(param, TyperOption) and param.is_flag:
        return ""
    described = param.type_descriptor
    if described.is_choice:
        return None  # typer lists the choices
    if described.annotation is int:
        return "N"
    if described.is_path:
        return described.path_type.upper()
    return (param.name or "value").upper()
