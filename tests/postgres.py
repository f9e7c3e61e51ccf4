"""A PostgreSQL schema of its own for a test (or a module of tests), on the server CI starts."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.conftest import require


@contextmanager
def postgres_schema_url(prefix: str) -> Iterator[str]:
    """A URL whose ``search_path`` is a new, empty schema; the schema is dropped afterwards."""
    url = os.environ.get("TAKEOFF_TEST_POSTGRES_URL")
    require("PostgreSQL", bool(url), "set TAKEOFF_TEST_POSTGRES_URL (.ci/run does)")
    assert url is not None
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")
