"""``takeoff sdk wheel DIR``: the SDK as a wheel, for images that bring their own (docs/design.md §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from takeoff._sdk_wheel import sdk_wheel
from takeoff.cli._output import fail

sdk_app = typer.Typer(help="The Takeoff SDK for job images.", no_args_is_help=True)


@sdk_app.command("wheel")
def wheel(
    directory: Annotated[
        Path, typer.Argument(help="Where to write the wheel (made if missing).", show_default=False)
    ],
) -> None:
    """Write a wheel of this Takeoff's SDK and print its path.

    Install it in an image with `pip install PATH` (its dependencies come from your package index); it
    is the `takeoff-sdk` distribution, never the unrelated `takeoff` package of the public index.
    """
    try:
        path = sdk_wheel().write(directory)
    except OSError as error:
        fail(f"could not write the wheel into {directory}: {error.strerror or error}")
    typer.echo(path)


def register(app: typer.Typer) -> None:
    app.add_typer(sdk_app, name="sdk")
