"""PostgreSQL for the tests: a schema of their own on the server CI starts, and proof that a test meant for
PostgreSQL ran there (a test that silently fell back to SQLite would prove nothing about PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import require

_TABLES_IN_SCHEMA = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"


def postgres_url() -> str:
    """The test server's URL (skipped without one on a laptop; CI sets it)."""
    url = os.environ.get("TAKEOFF_TEST_POSTGRES_URL", "")
    require("PostgreSQL", bool(url), "set TAKEOFF_TEST_POSTGRES_URL (.ci/run does)")
    return url


@contextmanager
def postgres_schema_url(prefix: str) -> Iterator[str]:
    """A URL whose ``search_path`` is a new, empty schema; the schema is dropped afterwards."""
    url = postgres_url()
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


async def assert_on_postgresql(engine: AsyncEngine) -> set[str]:
    """Fail unless ``engine`` talks to a PostgreSQL server; returns the tables of its current schema."""
    assert engine.dialect.name == "postgresql", engine.dialect.name
    async with engine.connect() as connection:
        version = (await connection.execute(sa.text("SELECT version()"))).scalar_one()
        tables = set((await connection.execute(sa.text(_TABLES_IN_SCHEMA))).scalars())
    assert str(version).startswith("PostgreSQL "), version
    return tables


def assert_service_wrote_tables(url: str, prefix: str) -> None:
    """Fail unless the schema of ``url`` holds tables named ``prefix...``: proof that a service process
    given ``url`` really kept its data on this PostgreSQL server."""
    with psycopg.connect(url) as connection:
        version = str(connection.execute("SELECT version()").fetchone())
        tables = [row[0] for row in connection.execute(_TABLES_IN_SCHEMA)]
    assert "PostgreSQL " in version, version
    assert any(table.startswith(prefix) for table in tables), f"no {prefix}* table in {sorted(tables)}"
