"""What every runner does alike with a launch's secrets (docs/design.md §7, "Secrets and the CA"):
the names it takes, and the private directory a job on this host finds its secret files in.

Values never leave the functions that write them: no message, log line or exception names one (names are
not secret: ``takeoff secrets list`` shows them).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from takeoff_agent.runners.base import Launch, RunnerRefused

SECRETS_DIR_VARIABLE = "TAKEOFF_SECRETS_DIR"
"""The directory holding the job's secret files, one per name."""
CA_FILE_VARIABLE = "TAKEOFF_TLS_CA_FILE"
"""The CA certificate of the registry the job is given, when that registry uses TLS."""
CONTAINER_SECRETS_DIR = "/run/takeoff/secrets"
"""Where a container or a pod finds its secret files."""
CONTAINER_CA_FILE = "/run/takeoff/ca.pem"
"""Where a container or a pod finds the CA certificate."""
LEASE_SECRETS_DIR = "secrets"
"""The secret files' directory in the lease directory (local-process, local-container)."""

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_NAME = re.compile(r"[-._a-zA-Z0-9]{1,200}")
"""One path component that is also a Kubernetes Secret key (behind a prefix): the same names on every
runner."""


def check_names(launch: Launch) -> None:
    """RunnerRefused naming each secret variable that is not an environment variable name and each secret
    file name that is not one plain path component (``[-._a-zA-Z0-9]``, at most 200, not ``.``/``..``)."""
    problems = [
        f"secret variable {name!r}: not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        for name in launch.secrets
        if not _VARIABLE_NAME.fullmatch(name)
    ]
    problems += [
        f"secret file {name!r}: a file name is [-._a-zA-Z0-9]{{1,200}}, not '.' or '..'"
        for name in launch.secret_files
        if not _FILE_NAME.fullmatch(name) or name in (".", "..")
    ]
    if problems:
        raise RunnerRefused("; ".join(problems))


def numeric_user(user: str | None) -> int | None:
    """The uid of a container user given as ``uid`` or ``uid:gid``; None for a name (only the image's
    ``/etc/passwd`` knows it), or none given."""
    uid = (user or "").partition(":")[0]
    return int(uid) if uid.isdecimal() else None


def write_secret_files(directory: Path, files: Mapping[str, bytes], owner: int | None = None) -> None:
    """``directory`` (mode 0700), holding exactly ``files`` (each 0600), made anew: what an earlier,
    unfinished start left there is replaced. It goes with the lease directory it is in. ``owner``: the
    uid they are given, when this process may (a container's job that runs as that non-root uid reads
    them through a bind mount); else they are this process's user's."""
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)  # whatever the umask
    for name, value in files.items():
        descriptor = os.open(
            directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        os.fchmod(descriptor, 0o600)  # whatever the umask
        with os.fdopen(descriptor, "wb") as file:
            file.write(value)
    if owner is not None and owner != os.geteuid() and os.geteuid() == 0:
        for path in (directory, *(directory / name for name in files)):
            os.chown(path, owner, -1, follow_symlinks=False)
