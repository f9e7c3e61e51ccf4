"""The cached ``INSERT ... ON CONFLICT`` statements (libs/takeoff_server/upserts.py), on SQLite and
PostgreSQL: what they store and return, that the columns' types convert the values, and that the engine
compiles each once (the dialects' own ``on_conflict`` inserts compile at every execution)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from takeoff_server.database import async_database_url
from takeoff_server.sqltypes import UtcDateTime
from takeoff_server.upserts import insert_unless_present, upsert
from tests.postgres import assert_on_postgresql, postgres_schema_url

metadata = sa.MetaData()
things = sa.Table(
    "upsert_things",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Column("create_time", UtcDateTime, nullable=False),
    sa.Column("update_time", UtcDateTime, nullable=False),
)
INSERTED = ("name", "detail", "create_time", "update_time")
EARLY = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATE = datetime(2026, 6, 7, 8, 9, 10, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        engine = create_async_engine(async_database_url(f"sqlite:///{tmp_path / 'upserts.db'}"))
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        yield engine
        await engine.dispose()
        return
    with postgres_schema_url("upserts") as url:
        engine = create_async_engine(async_database_url(url))
        try:
            await assert_on_postgresql(engine)
            async with engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
            yield engine
        finally:
            await engine.dispose()


def thing(name: str, when: datetime, **detail: Any) -> dict[str, Any]:
    return {"name": name, "detail": detail, "create_time": when, "update_time": when}


async def stored(connection: AsyncConnection) -> list[tuple[Any, ...]]:
    query = sa.select(things.c.name, things.c.detail, things.c.create_time, things.c.update_time)
    return [tuple(row) for row in (await connection.execute(query.order_by(things.c.name))).all()]


async def test_insert_unless_present_stores_a_new_row_and_leaves_a_stored_one_alone(
    engine: AsyncEngine,
) -> None:
    statement = insert_unless_present(things, INSERTED)
    async with engine.begin() as connection:
        first = (await connection.execute(statement, thing("a", EARLY, n=1))).all()
        again = (await connection.execute(statement, thing("a", LATE, n=2))).all()
        assert [type(row.seq) for row in first] == [int]  # the row's key: it went in
        assert again == []  # the unique name conflicted: nothing stored, nothing returned
        assert await stored(connection) == [("a", {"n": 1}, EARLY, EARLY)]  # JSON and UTC times as given


async def test_insert_unless_present_with_many_rows_inserts_each_missing_one(engine: AsyncEngine) -> None:
    statement = insert_unless_present(things, INSERTED)
    async with engine.begin() as connection:
        await connection.execute(statement, thing("b", EARLY, n=1))
        await connection.execute(statement, [thing("a", LATE, n=2), thing("b", LATE, n=3), thing("c", LATE)])
        assert await stored(connection) == [
            ("a", {"n": 2}, LATE, LATE),
            ("b", {"n": 1}, EARLY, EARLY),
            ("c", {}, LATE, LATE),
        ]


async def test_upsert_inserts_then_sets_the_update_columns_of_the_stored_row(engine: AsyncEngine) -> None:
    statement = upsert(
        things,
        INSERTED,
        conflict=("name",),
        update=("detail", "update_time"),
        returning=("create_time", "update_time"),
    )
    async with engine.begin() as connection:
        created = (await connection.execute(statement, thing("a", EARLY, n=1))).one()
        updated = (await connection.execute(statement, thing("a", LATE, n=2))).one()
        assert tuple(created) == (EARLY, EARLY)
        assert tuple(updated) == (EARLY, LATE)  # the stored row: its create time kept
        assert await stored(connection) == [("a", {"n": 2}, EARLY, LATE)]


async def test_upsert_without_returning_returns_no_rows(engine: AsyncEngine) -> None:
    statement = upsert(things, INSERTED, conflict=("name",), update=("update_time",))
    async with engine.begin() as connection:
        await connection.execute(statement, thing("a", EARLY, n=1))
        result = await connection.execute(statement, thing("a", LATE, n=2))
        assert not result.returns_rows
        assert await stored(connection) == [("a", {"n": 1}, EARLY, LATE)]


async def test_each_statement_compiles_once_where_the_dialects_on_conflict_insert_compiles_every_time(
    engine: AsyncEngine,
) -> None:
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statements: list[tuple[str, Any]] = [
        ("dialect", dialect_insert(things).on_conflict_do_nothing()),
        ("nothing", insert_unless_present(things, INSERTED)),
        ("upsert", upsert(things, INSERTED, conflict=("name",), update=("update_time",), returning=("seq",))),
    ]
    async with engine.begin() as connection:
        caching: dict[str, list[object]] = {}
        for label, statement in statements:
            for number in range(3):
                result = await connection.execute(statement, thing(f"{label}{number}", EARLY))
                assert isinstance(result, CursorResult)
                caching.setdefault(label, []).append(result.context.cache_hit)
    no_key, hit = DefaultDialect.NO_CACHE_KEY, DefaultDialect.CACHE_HIT
    assert caching["dialect"] == [no_key] * 3  # what the helpers are for: this compiles every time
    assert caching["nothing"][1:] == [hit, hit]
    assert caching["upsert"][1:] == [hit, hit]


def test_the_same_table_and_columns_give_the_same_statement() -> None:
    assert insert_unless_present(things, INSERTED) is insert_unless_present(things, INSERTED)
    assert upsert(things, INSERTED, conflict=("name",), update=("update_time",)) is upsert(
        things, INSERTED, conflict=("name",), update=("update_time",)
    )
