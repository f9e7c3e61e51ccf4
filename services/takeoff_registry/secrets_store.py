"""The table of users' secrets and the queries on it, on SQLite or PostgreSQL.

A row holds a secret's value only as ciphertext (:mod:`takeoff_registry.secrets` encrypts it); nothing here
sees a plaintext value. Writes go through :meth:`RegistryStore.write`, so they share the registry's one
SQLite writer and its transactions; setting a secret is a single upsert, safe against a concurrent set of
the same secret by another registry sharing a PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel, col, delete, select

from takeoff_registry.store import RegistryStore, Tx
from takeoff_server.sqltypes import UtcDateTime
from takeoff_server.upserts import upsert


class SecretRow(SQLModel, table=True):
    """One secret of a project; ``ciphertext`` is a Fernet token, never the value."""

    __tablename__ = "registry_secrets"

    project_id: str = Field(foreign_key="registry_projects.project_id", primary_key=True, max_length=63)
    secret_id: str = Field(primary_key=True, max_length=63)
    ciphertext: bytes = Field(sa_type=sa.LargeBinary)
    create_time: datetime = Field(sa_type=UtcDateTime)
    update_time: datetime = Field(sa_type=UtcDateTime)


_secrets = SecretRow.__table__  # type: ignore[attr-defined]
_PUT = upsert(
    _secrets,
    ("project_id", "secret_id", "ciphertext", "create_time", "update_time"),
    conflict=("project_id", "secret_id"),
    update=("ciphertext", "update_time"),
    returning=("create_time", "update_time"),
)
"""Built once (see takeoff_server.upserts): a stored secret keeps its create time."""


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """A secret's row without its ciphertext: what lists and answers to writes carry."""

    project_id: str
    secret_id: str
    create_time: datetime
    update_time: datetime


class SecretStore:
    """Reads and writes ``registry_secrets`` in the registry's database."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def put(self, project_id: str, secret_id: str, ciphertext: bytes, now: datetime) -> StoredSecret:
        """Create the secret, or replace its ciphertext (its create time is kept)."""
        async with self._store.write() as tx:
            await tx.ensure_project(project_id, now)
            values = {
                "project_id": project_id,
                "secret_id": secret_id,
                "ciphertext": ciphertext,
                "create_time": now,
                "update_time": now,
            }
            stored = await (await tx.session.connection()).execute(_PUT, values)
            create_time, update_time = stored.one()
        return StoredSecret(project_id, secret_id, create_time, update_time)

    async def ciphertext(self, project_id: str, secret_id: str) -> bytes | None:
        async with self._store.read() as tx:
            query = select(SecretRow.ciphertext).where(
                SecretRow.project_id == project_id, SecretRow.secret_id == secret_id
            )
            return (await tx.session.exec(query)).first()

    async def list(self, project_id: str, *, after: str | None, limit: int) -> Sequence[StoredSecret]:
        """At most ``limit`` secrets of the project with ids after ``after``, ordered by id (byte order on
        every database, so pages continue the same way on SQLite and PostgreSQL)."""
        async with self._store.read() as tx:
            secret_id: Any = col(SecretRow.secret_id)
            if _dialect(tx) == "postgresql":
                secret_id = secret_id.collate("C")
            query = select(
                SecretRow.project_id, SecretRow.secret_id, SecretRow.create_time, SecretRow.update_time
            ).where(SecretRow.project_id == project_id)
            if after is not None:
                query = query.where(secret_id > after)
            rows = (await tx.session.exec(query.order_by(secret_id).limit(limit))).all()
        return [StoredSecret(*row) for row in rows]

    async def delete(self, project_id: str, secret_id: str) -> bool:
        """Delete the secret; False when there was none."""
        async with self._store.write() as tx:
            statement = (
                delete(SecretRow)
                .where(col(SecretRow.project_id) == project_id, col(SecretRow.secret_id) == secret_id)
                .returning(col(SecretRow.secret_id))
            )
            # RETURNING, not rowcount: the async PostgreSQL driver reports no row count here.
            return (await tx.session.exec(statement)).first() is not None


def _dialect(tx: Tx) -> str:
    return tx.session.bind.dialect.name
