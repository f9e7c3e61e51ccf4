"""``takeoff job create|list|describe|versions|delete`` and ``takeoff job alias set|delete``: turn code into
job versions, look at them, name them and remove them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from takeoff.cli._output import (
    Column,
    Listing,
    WideOption,
    confirm_deletion,
    console,
    error_console,
    fail,
    print_json,
    short_time,
    usage_error,
)
from takeoff.cli._registry import (
    JsonOption,
    ProjectOption,
    human_bytes,
    read_json_object,
    takeoff_client,
    when,
)
from takeoff.models import (
    Artifact,
    CodeSource,
    CreatedJobVersion,
    Environment,
    GitSource,
    ImageSource,
    JobInputs,
    JobSource,
    JobVersion,
)

job_app = typer.Typer(help="Create and inspect jobs and their versions.", no_args_is_help=True)
alias_app = typer.Typer(help="Point names such as prod at versions of a job.", no_args_is_help=True)
job_app.add_typer(alias_app, name="alias")

REQUIREMENTS_FILE = "requirements.txt"
"""Read from the job's directory when --requirements is not given, as pip users keep it."""

JobArgument = Annotated[str, typer.Argument(help="Job: its id or resource name.", show_default=False)]


def _file_option(help_text: str) -> Any:
    return typer.Option(help=help_text, exists=True, dir_okay=False, readable=True, show_default=False)


@job_app.command("create")
def create(
    *,
    name: Annotated[str, typer.Option("--name", "-n", help="Job id, e.g. train-mnist.", show_default=False)],
    path: Annotated[
        Path | None,
        typer.Argument(help="Directory to pack and upload as the job's code.", exists=True, file_okay=False),
    ] = None,
    git: Annotated[
        str | None, typer.Option(help="Git remote URL to build from instead of a directory.")
    ] = None,
    ref: Annotated[
        str, typer.Option(help="Branch, tag or commit of --git (default: the remote's HEAD)")
    ] = "",
    image: Annotated[
        str | None, typer.Option(help="Prebuilt container image to run instead of code.")
    ] = None,
    entrypoint: Annotated[
        str | None, typer.Option(help='Command to run, e.g. "python train.py" (split as a shell would).')
    ] = None,
    requirements: Annotated[
        Path | None,
        _file_option(f"requirements.txt to install (default: PATH/{REQUIREMENTS_FILE}, if there)."),
    ] = None,
    python: Annotated[str, typer.Option(help="Python version, e.g. 3.11 (default: the builder's)")] = "",
    config_schema: Annotated[
        Path | None, _file_option("JSON Schema of the run config (a JSON or YAML file).")
    ] = None,
    config_defaults: Annotated[Path | None, _file_option("Default run config (a JSON or YAML file).")] = None,
    base_image: Annotated[str, typer.Option(help="Base image for container builds.")] = "",
    dockerfile: Annotated[Path | None, _file_option("Custom Dockerfile for container builds.")] = None,
    context: Annotated[
        str, typer.Option(help="Subdirectory that is the build context and working dir.")
    ] = "",
    metric: Annotated[list[str] | None, typer.Option(help="A metric the job logs (repeatable).")] = None,
    alias: Annotated[
        list[str] | None, typer.Option(help="Alias to point at the version (repeatable).")
    ] = None,
    description: Annotated[str, typer.Option(help="What changed in this version.")] = "",
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create the next version of a job from a directory, a git repository or an image."""
    source = _source(path, git, ref, image)
    argv = split_command(entrypoint, "--entrypoint")
    if not argv and not isinstance(source, ImageSource):
        fail("--entrypoint is required for code and git jobs, e.g. --entrypoint 'python train.py'")
    requirements = requirements or _found_requirements(path)
    environment = Environment(
        python_version=python,
        requirements=requirements.read_text() if requirements else "",
        base_image=base_image,
        dockerfile=dockerfile.read_text() if dockerfile else "",
        build_context=context,
    )
    inputs = JobInputs(read_json_object(config_schema), read_json_object(config_defaults))
    status = console.status("packing and uploading the code..." if path else "creating the version...")
    with takeoff_client(project) as client, status:
        created = client.create_job_version(
            name,
            source,
            entrypoint=argv,
            environment=environment,
            inputs=inputs,
            outputs=metric or [],
            description=description,
            aliases=alias or [],
        )
    if json_output:
        print_json(created)
    else:
        _print_created(created)


@job_app.command("list")
def list_jobs(
    wide: WideOption = False, project: ProjectOption = None, json_output: JsonOption = False
) -> None:
    """List the jobs of a project."""
    with takeoff_client(project) as client:
        jobs = list(client.list_jobs())
        if json_output:
            print_json(jobs)
            return
        if not jobs:
            console.print(f"no jobs in project {client.project}")
            return
        listing = Listing(
            [
                Column("job"),
                Column("versions", justify="right"),
                Column("latest"),
                Column("aliases", free_text=True),
                Column("updated"),
            ],
            wide=wide,
            title=f"jobs in {client.project}",
        )
        for job in jobs:
            aliases = ", ".join(
                f"{alias}→v{n}" for alias, n in sorted(job.aliases.items()) if alias != "latest"
            )
            latest = f"v{job.version_count - 1}" if job.version_count else "-"
            listing.add_row(
                job.id, str(job.version_count), latest, aliases, short_time(job.update_time, wide)
            )
        listing.print()


@job_app.command("versions")
def versions(
    job: JobArgument, wide: WideOption = False, project: ProjectOption = None, json_output: JsonOption = False
) -> None:
    """List the versions of a job, newest first, with their aliases."""
    with takeoff_client(project) as client:
        found = list(client.list_job_versions(job))
    if json_output:
        print_json(found)
        return
    listing = Listing(
        [
            Column("version"),
            Column("aliases", free_text=True),
            Column("created"),
            Column("source", free_text=True),
            Column("description", free_text=True, wide_only=True),
            Column("digest", wide_only=True),
        ],
        wide=wide,
        title=f"versions of {job}",
    )
    for version in found:
        listing.add_row(
            f"v{version.version}",
            ", ".join(version.aliases),
            short_time(version.create_time, wide),
            escape(_describe_source(version.source)),
            escape(version.description),
            version.digest,
        )
    listing.print()


@job_app.command("delete")
def delete(
    job: JobArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking first.")] = False,
    project: ProjectOption = None,
) -> None:
    """Delete a job with all its versions; asks first unless --yes."""
    with takeoff_client(project) as client:
        found = client.get_job(job)
        if not yes:
            confirm_deletion(f"job {found.id} and its {found.version_count} version(s)")
        client.delete_job(job)
    console.print(f"deleted job {found.id}")


@alias_app.command("set")
def set_alias(
    job: JobArgument,
    alias: Annotated[str, typer.Argument(help="Alias, e.g. prod.", show_default=False)],
    version: Annotated[str, typer.Argument(help="Version: N or vN.", show_default=False)],
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Point ALIAS at a version of JOB, moving it if it points elsewhere."""
    with takeoff_client(project) as client:
        updated = client.set_alias(job, alias, _version_number(version))
    if json_output:
        print_json(updated)
    else:
        console.print(f"{updated.id}:{alias} → v{updated.aliases[alias]}", markup=False)


@alias_app.command("delete")
def delete_alias(
    job: JobArgument,
    alias: Annotated[str, typer.Argument(help="Alias to remove.", show_default=False)],
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove ALIAS from JOB; the version it pointed at stays."""
    with takeoff_client(project) as client:
        updated = client.delete_alias(job, alias)
    if json_output:
        print_json(updated)
    else:
        console.print(f"removed alias {alias} of job {updated.id}", markup=False)


@job_app.command("describe")
def describe(
    reference: Annotated[
        str, typer.Argument(help="Job reference: JOB, JOB:ALIAS, JOB:vN or a resource name.")
    ],
    project: ProjectOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show a job version: its source, entrypoint, environment and config."""
    with takeoff_client(project) as client:
        version = client.get_job_version(reference)
        job = client.get_job(version.job)
    if json_output:
        print_json({"job": job, "version": version})
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("version", f"{version.ref}  ({version.name})")
    table.add_row("aliases", ", ".join(version.aliases) or "-")
    table.add_row("created", when(version.create_time))
    table.add_row("source", _describe_source(version.source))
    table.add_row("entrypoint", shlex.join(version.entrypoint) or "(the image's own)")
    for label, value in _environment_rows(version):
        table.add_row(label, value)
    table.add_row("config schema", _json_text(version.inputs.schema))
    table.add_row("config defaults", _json_text(version.inputs.defaults))
    if version.outputs:
        table.add_row("metrics", ", ".join(version.outputs))
    if version.description:
        table.add_row("description", version.description)
    table.add_row("digest", version.digest)
    all_aliases = ", ".join(f"{alias}→v{n}" for alias, n in sorted(job.aliases.items()))
    table.add_row("job", f"{job.version_count} version(s); {all_aliases}")
    console.print(table)


def _version_number(text: str) -> int:
    number = text.removeprefix("v")
    if not number.isdigit():
        usage_error(f"version {text!r} is not N or vN, e.g. 3 or v3")
    return int(number)


def _found_requirements(path: Path | None) -> Path | None:
    """The job directory's requirements.txt, said aloud: it changes what the version installs."""
    found = path / REQUIREMENTS_FILE if path is not None else None
    if found is None or not found.is_file():
        return None
    error_console.print(f"using {found} (--requirements FILE to give another)", markup=False, highlight=False)
    return found


def _source(path: Path | None, git: str | None, ref: str, image: str | None) -> Path | JobSource:
    given = [source for source in (path, git, image) if source is not None]
    if len(given) != 1:
        fail("give exactly one source: a directory PATH, --git URL or --image REFERENCE")
    if ref and git is None:
        fail("--ref goes with --git")
    if git is not None:
        return GitSource(git, ref)
    if image is not None:
        return ImageSource(image)
    assert path is not None
    return path


def split_command(command: str | None, option: str) -> list[str]:
    """A command line given to ``option`` as its arguments, split as a shell would."""
    try:
        return shlex.split(command or "")
    except ValueError as error:
        usage_error(f"{option} {command!r} cannot be split into arguments: {error}")


def _print_created(created: CreatedJobVersion) -> None:
    version = created.version
    if created.reused_existing:
        console.print(f"[yellow]unchanged[/]: {version.ref} already has this content; no new version")
    else:
        console.print(f"[green]created[/] {version.ref}  ({version.name})")
    console.print(f"aliases: {', '.join(version.aliases)}")
    console.print(f"source: {_describe_source(version.source, created.artifact)}")


def _describe_source(source: JobSource, artifact: Artifact | None = None) -> str:
    match source:
        case CodeSource():
            size = artifact.size_bytes if artifact else source.size_bytes
            text = f"code {source.sha256[:12]} ({human_bytes(size)}"
            if artifact is not None:
                files = f"{len(artifact.files)} file{'' if len(artifact.files) == 1 else 's'}"
                text += f", {files}, {'uploaded' if artifact.uploaded else 'already stored'}"
            return text + ")"
        case GitSource():
            return f"git {source.url} {source.ref or 'HEAD'} @ {source.commit[:12] or '?'}"
        case ImageSource():
            return f"image {source.reference}"


def _environment_rows(version: JobVersion) -> list[tuple[str, str]]:
    environment = version.environment
    rows = [
        ("python", environment.python_version),
        ("base image", environment.base_image),
        ("build context", environment.build_context),
        ("requirements", environment.requirements.strip()),
        ("dockerfile", f"{len(environment.dockerfile.splitlines())} lines" if environment.dockerfile else ""),
    ]
    return [(label, value) for label, value in rows if value]


def _json_text(value: dict[str, Any] | None) -> str:
    return "-" if value is None else json.dumps(value, indent=2, sort_keys=True)


def register(app: typer.Typer) -> None:
    app.add_typer(job_app, name="job")
