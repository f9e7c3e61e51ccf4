"""Idempotent creates (AIP-155): which ``request_id`` created what, so that a retry gets the same answer.

Each service keeps the records in a table of its own, declared with :func:`request_ids_table` in its
metadata and created by its migrations. A record holds the request's fingerprint (a digest of every
request field but the id) and a short ``result`` the service chose, typically the created resource's
name; a retry replays it by reading that resource. Records are kept for good (the API promises at
least 24 hours). Call :meth:`RequestIds.replay` and :meth:`RequestIds.remember` in the same transaction as
the create itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.sqltypes import UtcDateTime
from takeoff_server.validation import check_text

MAX_REQUEST_ID_LENGTH = 128


def check_request_id(request_id: str, *, field: str = "request_id") -> str:
    """Return ``request_id`` (empty: none given) if it fits the API's limit and holds no NUL character
    (the ``request_ids`` tables keep it as text: see :func:`takeoff_server.validation.check_text`)."""
    return check_text(request_id, field=field, max_chars=MAX_REQUEST_ID_LENGTH)


def request_fingerprint(request: Mapping[str, object]) -> str:
    """A digest of a request's fields (JSON-compatible values), independent of key order."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_ids_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """The table a service keeps its request ids in; ``scope`` names the method (and parent)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("scope", sa.String(256), primary_key=True),
        sa.Column("request_id", sa.String(MAX_REQUEST_ID_LENGTH), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )


class RequestIds:
    """Records and replays the results of requests that carried a ``request_id``."""

    def __init__(self, table: sa.Table) -> None:
        self._table = table
        # Built once: every request with an id runs them, and building one costs more than running it.
        self._recorded = select(table.c.fingerprint, table.c.result).where(
            table.c.scope == sa.bindparam("scope"), table.c.request_id == sa.bindparam("request_id")
        )
        self._insert = sa.insert(table)

    async def replay(
        self, session: AsyncSession, *, scope: str, request_id: str, fingerprint: str
    ) -> str | None:
        """The result recorded for ``request_id``, or None when it is new.

        The same id with a different fingerprint is ``REQUEST_ID_CONFLICT``. On PostgreSQL this takes a
        transaction-scoped advisory lock on the id, so concurrent retries of one request run one after
        the other and the later one replays the earlier.
        """
        if session.bind.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"{scope}\0{request_id}".encode()).digest()[:8], signed=True)
            await session.exec(select(sa.func.pg_advisory_xact_lock(key)))
        recorded = (
            await session.exec(self._recorded, params={"scope": scope, "request_id": request_id})
        ).first()
        if recorded is None:
            return None
        recorded_fingerprint, result = recorded
        if recorded_fingerprint != fingerprint:
            problem = "was already used with a different request"
            raise InvalidArgument(
                "REQUEST_ID_CONFLICT",
                f"request_id {request_id!r} {problem}; use a new request_id for a new request",
                violations=[FieldViolation("request_id", problem)],
            )
        return str(result)

    async def remember(
        self, session: AsyncSession, *, scope: str, request_id: str, fingerprint: str, result: str
    ) -> None:
        row = {
            "scope": scope,
            "request_id": request_id,
            "fingerprint": fingerprint,
            "result": result,
            "create_time": datetime.now(UTC),
        }
        await session.exec(self._insert, params=row)
