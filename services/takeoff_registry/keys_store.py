"""The registry's key table and its queries (migration 0002_keys), on SQLite or PostgreSQL.

A row holds what a key was made for and the SHA-256 digest of its secret (unique: the digest is how a
presented secret finds its key), never the secret. Writes go through :meth:`RegistryStore.write`, which
serializes writers on SQLite.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, SQLModel, col, select, update

from takeoff_registry.keys import Key
from takeoff_registry.store import RegistryStore
from takeoff_server.access import KeyKind, KeyScope, ProjectRole, ServiceRole
from takeoff_server.sqltypes import JsonText, UtcDateTime


class KeyRow(SQLModel, table=True):
    __tablename__ = "registry_keys"

    key_id: str = Field(primary_key=True, max_length=63)
    display_name: str = Field(max_length=200)
    kind: str = Field(max_length=16)
    """The KeyKind's name: ADMIN, PROJECT, AGENT, SERVICE or RUN."""
    projects: list[str] = Field(sa_type=JsonText)
    queues: list[str] = Field(sa_type=JsonText)
    secrets: list[str] = Field(sa_type=JsonText)
    role: str = Field(max_length=16)
    """Project keys: the ProjectRole's name; else empty."""
    service: str = Field(max_length=16)
    """Service keys: the ServiceRole's name; else empty."""
    run: str = Field(index=True, max_length=200)
    item: str = Field(max_length=300)
    job_version: str = Field(max_length=300)
    secret_digest: str = Field(unique=True, index=True, max_length=64)
    """SHA-256 of the secret, hex."""
    secret_hint: str = Field(max_length=80)
    creator: str = Field(max_length=200)
    create_time: datetime = Field(sa_type=UtcDateTime)
    revoke_time: datetime | None = Field(default=None, sa_type=UtcDateTime)


def _row(key: Key, digest: str) -> dict[str, object]:
    scope = key.scope
    return {
        "key_id": key.key_id,
        "display_name": key.display_name,
        "kind": scope.kind.name,
        "projects": list(scope.projects),
        "queues": list(scope.queues),
        "secrets": list(scope.secrets),
        "role": scope.role.name if scope.role is not None else "",
        "service": scope.service.name if scope.service is not None else "",
        "run": scope.run,
        "item": key.item,
        "job_version": scope.job_version,
        "secret_digest": digest,
        "secret_hint": key.secret_hint,
        "creator": key.creator,
        "create_time": key.create_time,
        "revoke_time": key.revoke_time,
    }


def _key(row: KeyRow) -> Key:
    return Key(
        key_id=row.key_id,
        display_name=row.display_name,
        scope=KeyScope(
            kind=KeyKind[row.kind],
            projects=tuple(row.projects),
            role=ProjectRole[row.role] if row.role else None,
            queues=tuple(row.queues),
            service=ServiceRole[row.service] if row.service else None,
            run=row.run,
            job_version=row.job_version,
            secrets=tuple(row.secrets),
        ),
        item=row.item,
        secret_hint=row.secret_hint,
        creator=row.creator,
        create_time=row.create_time,
        revoke_time=row.revoke_time,
    )


class SqlKeyStore:
    """:class:`takeoff_registry.keys.KeyStore` on the registry's database."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._dialect = store.database.engine.dialect.name

    async def insert(self, key: Key, digest: str) -> bool:
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        # Any conflict (the id, or the digest) stores nothing; RETURNING says whether a row went in.
        statement = (
            insert(KeyRow).values(**_row(key, digest)).on_conflict_do_nothing().returning(col(KeyRow.key_id))
        )
        async with self._store.write() as tx:
            return (await tx.session.exec(statement)).first() is not None

    async def get(self, key_id: str) -> Key | None:
        async with self._store.read() as tx:
            row = await tx.session.get(KeyRow, key_id)
        return _key(row) if row is not None else None

    async def by_digest(self, digest: str) -> Key | None:
        async with self._store.read() as tx:
            row = (await tx.session.exec(select(KeyRow).where(KeyRow.secret_digest == digest))).first()
        return _key(row) if row is not None else None

    async def page(
        self, *, after: tuple[str, str] | None, limit: int, show_revoked: bool, show_run_tokens: bool
    ) -> list[Key]:
        query = select(KeyRow)
        if not show_revoked:
            query = query.where(col(KeyRow.revoke_time).is_(None))
        if not show_run_tokens:
            query = query.where(KeyRow.kind != KeyKind.RUN.name)
        if after is not None:
            after_time = datetime.fromisoformat(after[0])
            query = query.where(
                sa.or_(
                    col(KeyRow.create_time) > after_time,
                    sa.and_(col(KeyRow.create_time) == after_time, col(KeyRow.key_id) > after[1]),
                )
            )
        query = query.order_by(col(KeyRow.create_time), col(KeyRow.key_id)).limit(limit)
        async with self._store.read() as tx:
            return [_key(row) for row in (await tx.session.exec(query)).all()]

    async def revoke(self, key_id: str, now: datetime) -> Key | None:
        async with self._store.write() as tx:
            await tx.session.exec(
                update(KeyRow)
                .where(col(KeyRow.key_id) == key_id, col(KeyRow.revoke_time).is_(None))
                .values(revoke_time=now)
            )
            row = (
                await tx.session.exec(
                    select(KeyRow).where(KeyRow.key_id == key_id).execution_options(populate_existing=True)
                )
            ).first()
            return _key(row) if row is not None else None

    async def revoke_run_tokens(self, run: str, now: datetime) -> int:
        async with self._store.write() as tx:
            revoked = await tx.session.exec(
                update(KeyRow)
                .where(
                    col(KeyRow.run) == run,
                    col(KeyRow.kind) == KeyKind.RUN.name,
                    col(KeyRow.revoke_time).is_(None),
                )
                .values(revoke_time=now)
                .returning(col(KeyRow.key_id))
            )
            return len(revoked.all())
