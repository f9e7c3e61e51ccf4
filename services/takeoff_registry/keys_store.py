"""The registry's key tables and their queries (migrations 0002_keys, 0007_run_token_signers), on SQLite or
PostgreSQL.

A key's row holds what it was made for and the SHA-256 digest of its secret (unique: the digest is how a
presented secret finds its key), never the secret. A signed run token has no row: its signer's has the
public key it is checked with, and a revoked run's row outlives every token of the run. Writes go through
:meth:`RegistryStore.write`, which serializes writers on SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from takeoff_registry.keys import Key, Signer
from takeoff_registry.store import RegistryStore
from takeoff_server.access import KeyKind, KeyScope, ProjectRole, ServiceRole
from takeoff_server.sqltypes import JsonText, UtcDateTime
from takeoff_server.upserts import insert_unless_present


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


class SignerRow(SQLModel, table=True):
    __tablename__ = "registry_run_token_signers"

    signer_id: str = Field(primary_key=True, max_length=63)
    public_key: bytes = Field(sa_type=sa.LargeBinary)
    creator_key_id: str = Field(max_length=63)
    create_time: datetime = Field(sa_type=UtcDateTime)


class RevokedRunRow(SQLModel, table=True):
    __tablename__ = "registry_revoked_runs"

    run: str = Field(primary_key=True, max_length=200)
    revoke_time: datetime = Field(sa_type=UtcDateTime)


keys = KeyRow.__table__  # type: ignore[attr-defined]
signers = SignerRow.__table__  # type: ignore[attr-defined]
revoked_runs = RevokedRunRow.__table__  # type: ignore[attr-defined]

# Built once: a statement built per call, and its cache key, cost more CPU than running it (VerifyKey,
# MintRunToken and RevokeRunTokens are on every job's path). Each takes its values from the parameters it
# runs with; the WHERE clause's are named apart from the columns.
_INSERT = insert_unless_present(keys, tuple(keys.c.keys()))
"""Any conflict (the id, or the digest) stores nothing."""
_BY_ID = sa.select(keys).where(keys.c.key_id == sa.bindparam("where_key_id"))
_BY_DIGEST = sa.select(keys).where(keys.c.secret_digest == sa.bindparam("where_digest"))
_REVOKE = keys.update().where(keys.c.key_id == sa.bindparam("where_key_id"), keys.c.revoke_time.is_(None))
_REVOKE_RUN_TOKENS = (
    keys.update()
    .where(
        keys.c.run.in_(sa.bindparam("where_runs", expanding=True)),
        keys.c.kind == KeyKind.RUN.name,
        keys.c.revoke_time.is_(None),
    )
    .returning(keys.c.key_id)
)
_REVOKE_RUN = insert_unless_present(revoked_runs, ("run", "revoke_time"))
"""A run revoked again keeps its first revoke time."""
_INSERT_SIGNER = insert_unless_present(signers, tuple(signers.c.keys()))
_SIGNER = sa.select(signers).where(signers.c.signer_id == sa.bindparam("where_signer_id"))
_SIGNED_TOKEN_LIVE = sa.select(
    sa.exists().where(keys.c.key_id == sa.bindparam("where_key_id"), keys.c.revoke_time.is_(None)),
    sa.exists().where(revoked_runs.c.run == sa.bindparam("where_run")),
)


def _key(row: sa.RowMapping) -> Key:
    return Key(
        key_id=row["key_id"],
        display_name=row["display_name"],
        scope=KeyScope(
            kind=KeyKind[row["kind"]],
            projects=tuple(row["projects"]),
            role=ProjectRole[row["role"]] if row["role"] else None,
            queues=tuple(row["queues"]),
            service=ServiceRole[row["service"]] if row["service"] else None,
            run=row["run"],
            job_version=row["job_version"],
            secrets=tuple(row["secrets"]),
        ),
        item=row["item"],
        secret_hint=row["secret_hint"],
        creator=row["creator"],
        create_time=row["create_time"],
        revoke_time=row["revoke_time"],
    )


class SqlKeyStore:
    """:class:`takeoff_registry.keys.KeyStore` on the registry's database."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def insert(self, key: Key, digest: str) -> bool:
        async with self._store.write_connection() as connection:
            return (await connection.execute(_INSERT, _row(key, digest))).first() is not None

    async def get(self, key_id: str) -> Key | None:
        return await self._one(_BY_ID, {"where_key_id": key_id})

    async def by_digest(self, digest: str) -> Key | None:
        return await self._one(_BY_DIGEST, {"where_digest": digest})

    async def page(
        self, *, after: tuple[str, str] | None, limit: int, show_revoked: bool, show_run_tokens: bool
    ) -> list[Key]:
        query = sa.select(keys)
        if not show_revoked:
            query = query.where(keys.c.revoke_time.is_(None))
        if not show_run_tokens:
            query = query.where(keys.c.kind != KeyKind.RUN.name)
        if after is not None:
            after_time = datetime.fromisoformat(after[0])
            query = query.where(
                sa.or_(
                    keys.c.create_time > after_time,
                    sa.and_(keys.c.create_time == after_time, keys.c.key_id > after[1]),
                )
            )
        query = query.order_by(keys.c.create_time, keys.c.key_id).limit(limit)
        async with self._store.read_connection() as connection:
            return [_key(row) for row in (await connection.execute(query)).mappings()]

    async def revoke(self, key_id: str, now: datetime) -> Key | None:
        async with self._store.write_connection() as connection:
            await connection.execute(_REVOKE, {"revoke_time": now, "where_key_id": key_id})
            row = (await connection.execute(_BY_ID, {"where_key_id": key_id})).mappings().first()
            return _key(row) if row is not None else None

    async def revoke_run_tokens(self, runs: Sequence[str], now: datetime) -> int:
        async with self._store.write_connection() as connection:
            revoked = await connection.execute(_REVOKE_RUN_TOKENS, {"revoke_time": now, "where_runs": runs})
            await connection.execute(_REVOKE_RUN, [{"run": run, "revoke_time": now} for run in runs])
            return len(revoked.all())

    async def insert_signer(self, signer: Signer) -> bool:
        row = {
            "signer_id": signer.signer_id,
            "public_key": signer.public_key,
            "creator_key_id": signer.creator_key_id,
            "create_time": signer.create_time,
        }
        async with self._store.write_connection() as connection:
            return (await connection.execute(_INSERT_SIGNER, row)).first() is not None

    async def signer(self, signer_id: str) -> Signer | None:
        async with self._store.read_connection() as connection:
            row = (await connection.execute(_SIGNER, {"where_signer_id": signer_id})).mappings().first()
        if row is None:
            return None
        return Signer(row["signer_id"], bytes(row["public_key"]), row["creator_key_id"], row["create_time"])

    async def signed_token_live(self, creator_key_id: str, run: str) -> bool:
        parameters = {"where_key_id": creator_key_id, "where_run": run}
        async with self._store.read_connection() as connection:
            creator_live, run_revoked = (await connection.execute(_SIGNED_TOKEN_LIVE, parameters)).one()
        return bool(creator_live) and not run_revoked

    async def _one(self, query: sa.Select[Any], parameters: dict[str, str]) -> Key | None:
        async with self._store.read_connection() as connection:
            row = (await connection.execute(query, parameters)).mappings().first()
        return _key(row) if row is not None else None
