"""Looking for secrets where they must never be: files (logs, SQLite databases and their -wal files, build
and lease directories, gzip members), and the text a command printed.

A finding names where (file and line) and which secret, with the secret itself blanked out of the excerpt,
so a failing test does not print what it guards.
"""

from __future__ import annotations

import base64
import gzip
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

WHOLE_TOKEN = re.compile(
    rb"tko_[a-z0-9-]+_(?:[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{86}|[A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])"
)
"""A whole key or run token: ``tko_{key id}_{43 random characters}``, or a run token the queue signed,
``tko_{signer}_{claims}.{signature}``; a ``secret_hint`` (``tko_{key id}_``) is not one."""

MAX_FILE_BYTES = 256 << 20
"""Files larger than this are read in part only (none of a test's homes holds one)."""


@dataclass(frozen=True)
class Secret:
    """A value that must not be found: ``label`` says what it is (``"agent key"``)."""

    label: str
    value: str

    @property
    def needle(self) -> bytes:
        return self.value.encode()


def basic_auth(label: str, user: str, password: str) -> Secret:
    """The ``user:password`` pair as HTTP basic auth and Docker's ``auths`` store it (base64): a password
    that leaks in that form is still a leak."""
    return Secret(f"{label} (base64 user:password)", base64.b64encode(f"{user}:{password}".encode()).decode())


@dataclass(frozen=True)
class Leak:
    label: str
    where: str
    line: int
    excerpt: str

    def __str__(self) -> str:
        return f"{self.label} in {self.where}:{self.line}: {self.excerpt}"


def _excerpt(data: bytes, start: int, end: int, secrets: Iterable[Secret]) -> str:
    line_start = data.rfind(b"\n", 0, start) + 1
    line_end = data.find(b"\n", end)
    line_end = len(data) if line_end < 0 else line_end
    window = data[max(line_start, start - 120) : min(line_end, end + 120)]
    for secret in secrets:
        window = window.replace(secret.needle, f"<{secret.label}>".encode())
    window = WHOLE_TOKEN.sub(lambda match: match.group(0)[:12] + b"...<token>", window)
    return window.decode(errors="replace")


def scan_bytes(
    where: str,
    data: bytes,
    secrets: Iterable[Secret],
    *,
    allowed: Iterable[str] = (),
    stray_tokens: bool = True,
) -> list[Leak]:
    """Every place in ``data`` that holds one of ``secrets`` (except values in ``allowed``), and, with
    ``stray_tokens``, every whole key or run token that is not one of ``allowed``."""
    secrets = list(secrets)
    allowed = set(allowed)
    leaks: list[Leak] = []
    for secret in secrets:
        if secret.value in allowed or not secret.value:
            continue
        start = data.find(secret.needle)
        while start >= 0:
            end = start + len(secret.needle)
            line = data.count(b"\n", 0, start) + 1
            leaks.append(Leak(secret.label, where, line, _excerpt(data, start, end, secrets)))
            start = data.find(secret.needle, end)
    if stray_tokens:
        known = {secret.needle for secret in secrets}
        for match in WHOLE_TOKEN.finditer(data):
            token = match.group(0)
            if token.decode() in allowed or token in known:
                continue  # a known secret is reported above by name (or allowed here)
            line = data.count(b"\n", 0, match.start()) + 1
            leaks.append(
                Leak("a key or run token", where, line, _excerpt(data, match.start(), match.end(), secrets))
            )
    return leaks


def _unpacked(data: bytes) -> bytes | None:
    """The content of a gzip or zlib stream, when ``data`` is one."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:1] == b"\x78" and len(data) > 2 and (data[0] * 256 + data[1]) % 31 == 0:
            return zlib.decompress(data)
    except (OSError, EOFError, zlib.error):
        return None
    return None


def files_under(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (links are not followed; sockets and pipes are left out)."""
    for path in sorted(root.rglob("*")):
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue  # gone meanwhile
        if stat.S_ISREG(mode):
            yield path


def scan_tree(
    root: Path, secrets: Iterable[Secret], *, allowed: Mapping[Path, Iterable[str]] | None = None
) -> tuple[list[Leak], list[Path]]:
    """Every leak in the files under ``root`` (``allowed``: the values a file may hold, e.g. a key file
    its own key); returns the leaks and the files read."""
    secrets = list(secrets)
    allowed = allowed or {}
    leaks: list[Leak] = []
    read: list[Path] = []
    for path in files_under(root):
        try:
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES)
        except OSError:
            continue
        read.append(path)
        own = allowed.get(path, ())
        leaks += scan_bytes(str(path), data, secrets, allowed=own)
        if (unpacked := _unpacked(data)) is not None:
            leaks += scan_bytes(f"{path} (unpacked)", unpacked, secrets, allowed=own)
    return leaks, read


def report(leaks: list[Leak]) -> str:
    return f"{len(leaks)} secret(s) found where none may be:\n" + "\n".join(f"  {leak}" for leak in leaks)
