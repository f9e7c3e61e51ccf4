"""What the commands share: the project, JSON and secret options, the key given with ``--key``, a client
whose errors are one line (never a traceback, never a key), JSON files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from takeoff._auth import FoundKey, find_key
from takeoff._pack import PackError
from takeoff.cli._output import fail
from takeoff.client import Client
from takeoff.errors import TakeoffError, UnauthenticatedError, UnavailableError
from takeoff.models import LogLine, LogStream, RunState, SecretMount
from takeoff_rpc.channels import TargetError, UnresolvedTarget

ProjectOption = Annotated[
    str | None,
    typer.Option(
        "--project", "-p", help="Project (default: TAKEOFF_PROJECT, else `default`).", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _secret_mount(text: str) -> SecretMount:
    try:
        return SecretMount.parse(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


SecretOption = Annotated[
    list[SecretMount] | None,
    typer.Option(
        "--secret",
        parser=_secret_mount,
        metavar="SECRET=ENV|SECRET:file=NAME",
        help="A secret of the project the job gets, as the environment variable ENV or as the file NAME"
        " in its TAKEOFF_SECRETS_DIR (repeatable); see `takeoff secrets`.",
        show_default=False,
    ),
]


class _Session:
    """What the command line's global options set (``takeoff --key KEY ...``)."""

    key: str | None = None


def use_key(key: str | None) -> None:
    """The key every client of this command presents (``--key``; the demo: its stack's admin key)."""
    _Session.key = key


def cli_key() -> FoundKey | None:
    """The key this command presents: ``--key``, TAKEOFF_API_KEY, TAKEOFF_TOKEN, the admin key file."""
    return FoundKey(_Session.key, "--key") if _Session.key else find_key()


STATE_STYLES = {
    RunState.STARTING: "yellow",
    RunState.RUNNING: "cyan",
    RunState.FINISHED: "green",
    RunState.FAILED: "red",
    RunState.CRASHED: "red",
    RunState.KILLED: "magenta",
}


@contextmanager
def takeoff_client(project: str | None) -> Iterator[Client]:
    """A client of the registry and the queue; an error from it ends the command with a one-line message."""
    try:
        client = Client(project=project, api_key=_Session.key)
    except (TargetError, UnresolvedTarget) as error:
        fail(f"cannot dial a service: {error}")
    except (ValueError, OSError) as error:  # the TLS files: missing, unreadable, or half a pair
        fail(f"cannot set up TLS: {error}")
    try:
        with client:
            yield client
    except TakeoffError as error:
        fail(one_line(error))
    except PackError as error:
        fail(str(error))


def one_line(error: TakeoffError) -> str:
    """The error with every field violation; several of them say it all, without the summary message.
    A refused key is named by where it came from, never by itself; a service that cannot be reached
    (UNAVAILABLE with no reason of the service's own) is named with what usually brings it up."""
    if len(error.violations) >= 2:
        return f"{error.reason}: " + "; ".join(f"{v.field}: {v.description}" for v in error.violations)
    text = str(error)
    if isinstance(error, UnauthenticatedError) and error.reason != "KEY_MISSING":
        found = cli_key()
        if found is not None:
            text += f" (key from {found.source})"
    if isinstance(error, UnavailableError) and error.reason == "UNAVAILABLE":
        text += (
            "; is the stack running? `takeoff up` starts one, or set TAKEOFF_REGISTRY and"
            " TAKEOFF_QUEUE_ADDRESS to running services"
        )
    return text


def read_json_object(path: Path | None) -> dict[str, Any] | None:
    """The object (mapping) a JSON or YAML file holds; None without a file."""
    if path is None:
        return None
    try:
        value = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        fail(f"{path} is neither JSON nor YAML: {str(error).splitlines()[0]}")
    if not isinstance(value, dict):
        fail(f"{path} must hold an object (a mapping), not {type(value).__name__}")
    return value


_LOG_LABELS = {LogStream.SYSTEM: "[takeoff] ", LogStream.BUILD: "[build] "}
"""How a line that the job did not print is told apart; an agent labels its own lines already."""


def log_line_text(line: LogLine) -> str:
    """A log line as ``takeoff logs`` prints it: what the job printed as it is, other lines labelled once,
    and in a multi-node launch each line led by its rank (``[rank 1] ...``)."""
    label = _LOG_LABELS.get(line.stream, "")
    text = line.text if line.text.startswith(label) else label + line.text
    return text if line.rank is None else f"[rank {line.rank}] {text}"


def log_line_json(line: LogLine) -> str:
    """A log line as one JSON object (``takeoff logs --json``), with its time and, in a multi-node
    launch, its rank."""
    time = line.time.isoformat() if line.time else None
    fields = {"index": line.index, "stream": line.stream, "text": line.text, "time": time}
    return json.dumps(fields if line.rank is None else {**fields, "rank": line.rank})


def styled_state(state: RunState) -> str:
    return f"[{STATE_STYLES[state]}]{state.value}[/]"


def when(moment: datetime | None) -> str:
    """A time as people read it in a table: local, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def version_ref(version_name: str) -> str:
    """``projects/p/jobs/train/versions/3`` as people write it: ``train:v3``."""
    if not version_name:
        return "-"
    job, _, number = version_name.rpartition("/versions/")
    return f"{job.rsplit('/', 1)[-1]}:v{number}"


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "-"
    seconds = int(((end or datetime.now(UTC)) - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    amount, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, bigger
    return f"{amount:.1f} {unit}"
