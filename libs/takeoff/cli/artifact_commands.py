"""``takeoff artifacts list|versions|describe|get``: the named artifacts runs log (checkpoints, models,
datasets), their versions, their lineage (the run that logged a version, the runs that used it) and their
files, fetched through the local cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from takeoff.cli._output import Column, Listing, WideOption, console, fail, print_json, short_id, short_time
from takeoff.cli._registry import JsonOption, ProjectOption, human_bytes, takeoff_client, when
from takeoff.models import ArtifactVersion

artifacts_app = typer.Typer(
    help="List, inspect and download the artifacts runs log (checkpoints, models, datasets).",
    no_args_is_help=True,
)

ReferenceArgument = Annotated[
    str,
    typer.Argument(
        help="Artifact version: ARTIFACT (its latest), ARTIFACT:ALIAS, ARTIFACT:vN or a resource name.",
        metavar="REF",
        show_default=False,
    ),
]
LimitOption = Annotated[int, typer.Option(help="Show at most this many.")]


@artifacts_app.command("list")
def list_artifacts(
    *,
    project: ProjectOption = None,
    type: Annotated[str, typer.Option("--type", help="Only artifacts of this type, e.g. checkpoint.")] = "",
    limit: LimitOption = 100,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """List a project's named artifacts by name."""
    with takeoff_client(project) as client:
        collections = list(itertools.islice(client.list_artifacts(type=type), limit))
        if json_output:
            print_json(collections)
            return
        if not collections:
            console.print(f"no artifacts in project {client.project}" + (f" of type {type}" if type else ""))
            return
        listing = Listing(
            [
                Column("artifact"),
                Column("type"),
                Column("versions", justify="right"),
                Column("latest"),
                Column("aliases", free_text=True),
                Column("updated"),
            ],
            wide=wide,
            title=f"artifacts in {client.project}",
        )
        for collection in collections:
            latest = collection.aliases.get("latest")
            others = sorted(
                (alias, number) for alias, number in collection.aliases.items() if alias != "latest"
            )
            listing.add_row(
                collection.id,
                collection.type,
                str(collection.version_count),
                "-" if latest is None else f"v{latest}",
                ", ".join(f"{alias}=v{number}" for alias, number in others),
                short_time(collection.update_time, wide),
            )
        listing.print()


@artifacts_app.command("versions")
def versions(
    artifact: Annotated[str, typer.Argument(help="Artifact id, e.g. ckpt.", show_default=False)],
    *,
    project: ProjectOption = None,
    limit: LimitOption = 50,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """List an artifact's versions, newest first, with the run that logged each."""
    with takeoff_client(project) as client:
        found = list(itertools.islice(client.list_artifact_versions(artifact), limit))
    if json_output:
        print_json(found)
        return
    listing = Listing(
        [
            Column("version"),
            Column("aliases", free_text=True),
            Column("size", justify="right"),
            Column("files", justify="right"),
            Column("logged by"),
            Column("used", justify="right"),
            Column("created"),
            Column("digest", wide_only=True),
        ],
        wide=wide,
        title=f"versions of {artifact}",
    )
    for version in found:
        listing.add_row(
            f"v{version.version}",
            ", ".join(version.aliases),
            human_bytes(version.size_bytes),
            str(len(version.files)),
            short_id(version.run.rsplit("/", 1)[-1], wide) if version.run else "-",
            str(version.use_count),
            short_time(version.create_time, wide),
            version.digest,
        )
    listing.print()


@artifacts_app.command("describe")
def describe(
    reference: ReferenceArgument, *, project: ProjectOption = None, json_output: JsonOption = False
) -> None:
    """Show an artifact version: its aliases, digest, metadata, lineage (the run that logged it, the runs
    that used it) and files."""
    with takeoff_client(project) as client:
        version = client.get_artifact_version(reference)
    if json_output:
        print_json(version)
        return
    console.print(_overview(version))
    if version.metadata:
        console.print(f"[bold]metadata[/]  {json.dumps(version.metadata, sort_keys=True)}", soft_wrap=True)
    listing = Listing(
        [Column("path", free_text=True), Column("size", justify="right"), Column("sha256")],
        wide=False,
        title="files",
    )
    for file in version.files:
        listing.add_row(file.path, human_bytes(file.size_bytes), file.sha256[:12])
    listing.print()


@artifacts_app.command("get")
def get(
    reference: ReferenceArgument,
    directory: Annotated[
        Path | None,
        typer.Argument(help="Where to put its files (default: ./artifacts/ARTIFACT:vN).", show_default=False),
    ] = None,
    *,
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Download an artifact version's files into a directory, through the local cache (TAKEOFF_CACHE_DIR,
    else ~/.cache/takeoff): files it holds already are not fetched again."""
    with takeoff_client(project) as client:
        version = client.get_artifact_version(reference)
        try:
            root, fetched = client.fetch_artifact(version, directory)
        except OSError as error:  # the directory or the cache cannot be written
            fail(f"cannot put {version.ref} in {directory or 'artifacts/'}: {error}")
    if json_output:
        print_json({"version": version, "directory": str(root), "fetched_bytes": fetched})
        return
    cached = (
        ""
        if fetched == version.size_bytes
        else f"; {human_bytes(version.size_bytes - fetched)} from the cache"
    )
    console.print(
        f"{version.ref}: {len(version.files)} file(s), {human_bytes(version.size_bytes)} in {root} "
        f"(fetched {human_bytes(fetched)}{cached})",
        soft_wrap=True,
        highlight=False,
    )


def _overview(version: ArtifactVersion) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("version", f"{version.ref}  ({version.name})")
    table.add_row("type", version.type)
    table.add_row("aliases", ", ".join(version.aliases) or "-")
    table.add_row("digest", version.digest)
    table.add_row("size", f"{human_bytes(version.size_bytes)} in {len(version.files)} file(s)")
    table.add_row("created", when(version.create_time))
    table.add_row("logged by", version.run.rsplit("/", 1)[-1] if version.run else "- (outside a run)")
    used = ", ".join(run.rsplit("/", 1)[-1] for run in version.used_by) or "-"
    if version.use_count > len(version.used_by):
        used += f" (and {version.use_count - len(version.used_by)} more)"
    table.add_row("used by", used)
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(artifacts_app, name="artifacts")
