"""``takeoff secrets set|list|delete``: a project's secrets. No command takes a value as an argument
(it would land in the shell's history) and none prints one."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from takeoff.cli._output import (
    Column,
    Listing,
    WideOption,
    console,
    fail,
    print_json,
    short_time,
    usage_error,
)
from takeoff.cli._registry import JsonOption, ProjectOption, takeoff_client

secrets_app = typer.Typer(
    help="Set, list and delete a project's secrets, which queues and launches give to jobs"
    " (--secret SECRET=ENV or SECRET:file=NAME).",
    no_args_is_help=True,
)

SecretArgument = Annotated[
    str, typer.Argument(help="Secret id (or its resource name).", metavar="SECRET", show_default=False)
]


def _read_value(value_file: Path | None, from_env: str | None) -> bytes:
    if value_file is not None and from_env is not None:
        usage_error("give the value one way: --value-file, --from-env, or standard input")
    if value_file is not None:
        try:
            return value_file.read_bytes()
        except OSError as error:
            fail(f"cannot read {value_file}: {error.strerror}")
    if from_env is not None:
        value = os.environ.get(from_env)
        if value is None:
            fail(f"the environment variable {from_env} is not set")
        return value.encode()
    if sys.stdin.isatty():
        return getpass.getpass("value (not shown): ").encode()
    data = sys.stdin.buffer.read()
    return data[:-1] if data.endswith(b"\n") else data


@secrets_app.command("set")
def set_secret(
    name: SecretArgument,
    value_file: Annotated[
        Path | None,
        typer.Option(help="Read the value from this file, as it is.", dir_okay=False, show_default=False),
    ] = None,
    from_env: Annotated[
        str | None,
        typer.Option(
            help="Read the value from this environment variable.", metavar="VAR", show_default=False
        ),
    ] = None,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a secret or replace its value (at most 64 KiB).

    The value comes from --value-file, --from-env, or standard input (typed
    without echo on a terminal; one trailing newline of piped input is dropped).
    It is never printed, and no command reads it back.
    """
    value = _read_value(value_file, from_env)
    if not value:
        fail("the value is empty")
    with takeoff_client(project) as client:
        secret = client.set_secret(name, value)
    if json_output:
        print_json(secret)
    else:
        console.print(f"[green]set[/] secret {secret.id} in {secret.project}")


@secrets_app.command("list")
def list_secrets(
    project: ProjectOption = None, wide: WideOption = False, json_output: JsonOption = False
) -> None:
    """List the project's secrets by name (never their values)."""
    with takeoff_client(project) as client:
        found = list(client.list_secrets())
        if json_output:
            print_json(found)
            return
        if not found:
            console.print(f"no secrets in project {client.project}")
            return
        listing = Listing(
            [Column("secret"), Column("created"), Column("updated")],
            wide=wide,
            title=f"secrets in {client.project}",
        )
        for secret in found:
            listing.add_row(
                secret.id, short_time(secret.create_time, wide), short_time(secret.update_time, wide)
            )
        listing.print()


@secrets_app.command("delete")
def delete(name: SecretArgument, project: ProjectOption = None) -> None:
    """Delete a secret; jobs already given it keep what they received."""
    with takeoff_client(project) as client:
        client.delete_secret(name)
    console.print(f"deleted secret {name}")


def register(app: typer.Typer) -> None:
    app.add_typer(secrets_app, name="secrets")
