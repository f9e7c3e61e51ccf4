"""Users' secrets: set, list and delete per project; a value goes back only to an attempt given it.

Values are encrypted at rest with Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) under the
registry's secrets key, a file kept beside the registry's other state (:func:`load_secrets_key`). The
plaintext encrypted is the secret's resource name, a NUL, then the value, so a ciphertext copied onto
another secret's row does not decrypt as that secret. No answer, log line or error message carries a
value: :meth:`Secrets.access` is the only way back to one, and the access rules let only run tokens
that list the secret call it, not even an admin key (docs/design.md §13).

Plain Python, no gRPC: ``secrets_api`` serves it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from takeoff_registry.secrets_store import SecretStore, StoredSecret
from takeoff_registry.store import RegistryStore
from takeoff_server.errors import FailedPrecondition, NotFound
from takeoff_server.names import ResourcePattern
from takeoff_server.pagination import PageRequest
from takeoff_server.validation import field_error

MAX_VALUE_BYTES = 64 * 1024
SECRET_ID_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,62}"
SECRET_ID_RULE = "1-63 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter"
SECRET = ResourcePattern("projects/{project}/secrets/{secret}", secret=SECRET_ID_PATTERN)
_SECRET_ID = re.compile(SECRET_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A secret's place: its project id and secret id."""

    project: str
    secret: str

    @property
    def name(self) -> str:
        return SECRET.format(project=self.project, secret=self.secret)

    @classmethod
    def parse(cls, name: str, *, field: str) -> SecretKey:
        return cls(**SECRET.parse(name, field=field))


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret without its value."""

    key: SecretKey
    create_time: datetime
    update_time: datetime


class SecretUnreadable(FailedPrecondition):
    """A stored value does not decrypt with the configured key (the key file was replaced, registry replicas
    do not share one, or the row was tampered with): FAILED_PRECONDITION ``SECRET_UNREADABLE``, naming the
    secret and the setting to check, never the value."""

    def __init__(self, key: SecretKey, why: str) -> None:
        super().__init__(
            "SECRET_UNREADABLE",
            f"secret {key.name} {why}; check secrets_key_file (every registry replica must share it)",
            metadata={"resource": key.name},
        )


def check_secret_id(secret_id: str, *, field: str) -> str:
    if _SECRET_ID.fullmatch(secret_id):
        return secret_id
    problem = f"secret id {secret_id!r} must be {SECRET_ID_RULE}" if secret_id else "a secret id is required"
    raise field_error(field, problem, reason="NAME_INVALID")


def load_secrets_key(path: Path) -> bytes:
    """The secrets key kept at ``path``, created (a new Fernet key, mode 0600) if there is none yet.

    The file holds one Fernet key per line; the first encrypts, every one decrypts, so a key is rotated by
    putting a new one first (values are re-encrypted under it as they are next set). Creating the file is
    atomic: registries sharing a home directory all end up with the first one's key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(Fernet.generate_key() + b"\n")
        try:
            os.link(partial, path)  # fails if another process created it meanwhile: keep theirs
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_bytes()


def _cipher(key: bytes) -> MultiFernet:
    keys = [line.strip() for line in key.splitlines() if line.strip()]
    if not keys:
        raise ValueError("the secrets key is empty: it needs at least one Fernet key")
    try:
        return MultiFernet([Fernet(line) for line in keys])
    except ValueError:
        # Never quote the key: say what is wrong with it only.
        raise ValueError(
            "the secrets key is not valid: each line must be a Fernet key (32 bytes, url-safe base64)"
        ) from None


def _now() -> datetime:
    return datetime.now(UTC)


def _secret(stored: StoredSecret) -> Secret:
    return Secret(SecretKey(stored.project_id, stored.secret_id), stored.create_time, stored.update_time)


def _not_found(key: SecretKey) -> NotFound:
    return NotFound("SECRET_NOT_FOUND", f"secret {key.name} does not exist", metadata={"resource": key.name})


class Secrets:
    """Sets, lists and deletes a project's secrets; decrypts one for an attempt given it."""

    def __init__(self, store: RegistryStore, key: bytes) -> None:
        self._rows = SecretStore(store)
        self._cipher = _cipher(key)

    async def set(self, key: SecretKey, value: bytes) -> Secret:
        """Create the secret or replace its value (the project is created if new)."""
        check_secret_id(key.secret, field="secret_id")
        if not value:
            raise field_error("value", "a value is required")
        if len(value) > MAX_VALUE_BYTES:
            raise field_error("value", f"must be at most {MAX_VALUE_BYTES} bytes (got {len(value)})")
        ciphertext = self._cipher.encrypt(_bound(key, value))
        return _secret(await self._rows.put(key.project, key.secret, ciphertext, _now()))

    async def list(self, project: str, *, page: PageRequest) -> tuple[list[Secret], str | None]:
        """One page of the project's secrets ordered by id, and the id to continue after (None at the
        end). A project never written to has none."""
        after = str(page.after[0]) if page.after else None
        rows = await self._rows.list(project, after=after, limit=page.size + 1)
        secrets = [_secret(row) for row in rows[: page.size]]
        return secrets, (rows[page.size - 1].secret_id if len(rows) > page.size else None)

    async def delete(self, key: SecretKey) -> None:
        if not await self._rows.delete(key.project, key.secret):
            raise _not_found(key)

    async def access(self, key: SecretKey) -> bytes:
        """The secret's value."""
        ciphertext = await self._rows.ciphertext(key.project, key.secret)
        if ciphertext is None:
            raise _not_found(key)
        try:
            plaintext = self._cipher.decrypt(ciphertext)
        except InvalidToken:
            raise SecretUnreadable(key, "does not decrypt with the registry's secrets key") from None
        prefix = _prefix(key)
        if not plaintext.startswith(prefix):
            raise SecretUnreadable(key, "holds a value encrypted for another secret")
        return plaintext[len(prefix) :]


def _prefix(key: SecretKey) -> bytes:
    return key.name.encode() + b"\0"


def _bound(key: SecretKey, value: bytes) -> bytes:
    """What is encrypted: the value bound to the secret's name."""
    return _prefix(key) + value
