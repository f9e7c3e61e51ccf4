"""``takeoff keys create|list|revoke``: API keys. A key's secret is printed once, by ``create``."""

from __future__ import annotations

from typing import Annotated

import typer

from takeoff.cli._output import (
    Column,
    Listing,
    WideOption,
    console,
    error_console,
    print_json,
    short_time,
    usage_error,
)
from takeoff.cli._registry import JsonOption, takeoff_client
from takeoff.models import Key, KeyKind, ProjectRole, ServiceRole

keys_app = typer.Typer(
    help="Create, list and revoke API keys (the registry keeps only their hashes).", no_args_is_help=True
)

KeyArgument = Annotated[
    str,
    typer.Argument(help="Key: its id, a unique prefix of it, or keys/ID.", metavar="KEY", show_default=False),
]
KEY_COLUMNS = (
    Column("key"),
    Column("kind"),
    Column("scope", free_text=True),
    Column("hint", wide_only=True),
    Column("created"),
    Column("name", free_text=True, wide_only=True),
)


@keys_app.command("create")
def create(
    *,
    kind: Annotated[
        KeyKind,
        typer.Option(
            help="admin: everything; project: --project and --role; agent: --queue;"
            " service: --service (run tokens are minted by the queue, not here).",
            case_sensitive=False,
            show_default=False,
        ),
    ],
    project: Annotated[
        list[str] | None,
        typer.Option(
            "--project", help="project keys: a project it may use (repeatable).", show_default=False
        ),
    ] = None,
    role: Annotated[
        ProjectRole | None,
        typer.Option(help="project keys: read, or write (read and write).", case_sensitive=False),
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            help="agent keys: a queue it may lease, projects/P/queues/Q or Q in TAKEOFF_PROJECT"
            " (else default) (repeatable).",
            show_default=False,
        ),
    ] = None,
    service: Annotated[
        ServiceRole | None, typer.Option(help="service keys: the service it is for.", case_sensitive=False)
    ] = None,
    name: Annotated[
        str, typer.Option("--name", help="The key's id (default: a generated one).", show_default=False)
    ] = "",
    display_name: Annotated[str, typer.Option(help="A label to recognise it by.", show_default=False)] = "",
    json_output: JsonOption = False,
) -> None:
    """Create a key and print its secret: the only time it is shown."""
    if kind is KeyKind.RUN:
        usage_error(
            "run tokens are minted by the queue for each attempt;"
            " create an admin, project, agent or service key"
        )
    with takeoff_client(None) as client:
        created = client.create_key(
            kind,
            projects=project or (),
            role=role,
            queues=queue or (),
            service=service,
            key_id=name,
            display_name=display_name,
        )
    if json_output:
        print_json(created)
        return
    console.print(f"[green]created[/] {kind} key [bold]{created.key.id}[/]  ({_scope(created.key)})")
    typer.echo(created.secret)
    error_console.print(
        "This is the only time the secret is shown: store it now (present it with --key or TAKEOFF_API_KEY)."
    )


@keys_app.command("list")
def list_keys(
    all_keys: Annotated[
        bool, typer.Option("--all", help="Also revoked keys and the run tokens the registry minted.")
    ] = False,
    wide: WideOption = False,
    json_output: JsonOption = False,
) -> None:
    """List keys: id, kind, what they reach, and the start of each secret (never the secret)."""
    with takeoff_client(None) as client:
        found = list(client.list_keys(show_revoked=all_keys, show_run_tokens=all_keys))
    if json_output:
        print_json(found)
        return
    if not found:
        console.print("no keys")
        return
    # Key ids stay whole: generated ones are short, and people choose the others.
    listing = Listing(KEY_COLUMNS, wide=wide, title="keys")
    for key in found:
        kind = str(key.kind or "?") + ("\n[red]revoked[/]" if key.revoked else "")
        scope = _scope(key)
        if key.display_name and not wide:
            scope += f"\n[dim]{key.display_name}[/]"
        created = short_time(key.create_time, wide)
        listing.add_row(key.id, kind, scope, key.secret_hint or "-", created, key.display_name)
    listing.print()


@keys_app.command("revoke")
def revoke(name: KeyArgument) -> None:
    """Revoke a key: every service refuses it within 5 seconds, its open streams included."""
    with takeoff_client(None) as client:
        key = client.revoke_key(name)
    console.print(f"[yellow]revoked[/] key {key.id}")


def _scope(key: Key) -> str:
    """What a key reaches, in a few words."""
    if key.kind is KeyKind.ADMIN:
        return "everything"
    if key.kind is KeyKind.PROJECT:
        projects = ", ".join(project.removeprefix("projects/") for project in key.projects)
        return f"{key.role or '?'} in {projects}"
    if key.kind is KeyKind.AGENT:
        return "lease " + ", ".join(_short_queue(queue) for queue in key.queues)
    if key.kind is KeyKind.SERVICE:
        return f"the {key.service or '?'} service"
    if key.kind is KeyKind.RUN:
        return f"write {key.run.removeprefix('projects/')}"
    return "-"


def _short_queue(name: str) -> str:
    """``projects/p/queues/q`` as ``p/q``."""
    parts = name.split("/")
    return f"{parts[1]}/{parts[3]}" if len(parts) == 4 else name


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
