"""Hot statements (libs/takeoff_server/hot_statements.py, docs/design.md §9 "Databases"): on a service's
SQLite database sqlite3 runs them itself, and what they store, answer and raise is what SQLAlchemy's
execution of the same statement stores, answers and raises; statements that need SQLAlchemy's execution
are refused when first compiled. Also the kept connection SQLite's write transactions share."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from takeoff_server.database import Database
from takeoff_server.hot_statements import HotStatement
from takeoff_server.sqltypes import JsonText, UtcDateTime

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String, unique=True, nullable=False),
    sa.Column("config", sa.JSON),
    sa.Column("metrics", JsonText),
    sa.Column("when", UtcDateTime),
    sa.Column("count", sa.Integer),
)
with_default = sa.Table(
    "with_default",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("n", sa.Integer, default=7),
)

_BY_NAMES = sa.select(things.c.seq).where(things.c.name.in_(sa.bindparam("names", expanding=True)))

ROWS: list[dict[str, Any]] = [
    {
        "name": "a",
        "config": {"lr": 0.1, "layers": [1, 2], "none": None},
        "metrics": {"loss": float("nan")},
        "when": datetime(2026, 12, 4, 9, 30, 1, 250, tzinfo=timezone(timedelta(hours=2))),
        "count": 3,
    },
    # None in a JSON column is JSON's null (SQLAlchemy's default), not SQL NULL.
    {"name": "b", "config": None, "metrics": None, "when": None, "count": None},
]


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    made = Database.for_service("hot", tmp_path, None)
    async with made.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    try:
        yield made
    finally:
        await made.close()


async def _stored(database: Database) -> list[tuple[Any, ...]]:
    """The rows as SQLite holds them, read past every type's processing."""
    async with database.engine.connect() as connection:
        found = await connection.exec_driver_sql('SELECT name, config, metrics, "when", count FROM things')
        return sorted(tuple(row) for row in found)


async def test_a_hot_insert_stores_what_sqlalchemy_stores(tmp_path: Path, database: Database) -> None:
    hot = HotStatement(things.insert())
    async with database.transaction() as connection:
        first = await hot.execute(connection, ROWS[0])
        await hot.execute(connection, [ROWS[1]])
    reference = Database.for_service("reference", tmp_path, None)
    try:
        async with reference.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(things.insert(), ROWS)
        assert await _stored(database) == await _stored(reference)
    finally:
        await reference.close()
    assert first.inserted_primary_key == (1,)
    # UtcDateTime's own SQLite processor writes DATETIME's text, so that rows compare and sort as before.
    assert ("a", "2026-12-04 07:30:01.000250") in [(row[0], row[3]) for row in await _stored(database)]
    async with database.engine.connect() as connection:
        read = (await connection.execute(sa.select(things.c.when).where(things.c.name == "a"))).scalar_one()
    assert read == ROWS[0]["when"].astimezone(UTC)


async def test_a_hot_update_and_select_answer_as_sqlalchemy_does(database: Database) -> None:
    insert = HotStatement(things.insert())
    update = HotStatement(things.update().where(things.c.name == sa.bindparam("where_name")))
    select = HotStatement(sa.select(things.c.seq).where(things.c.name == sa.bindparam("where_name")))
    async with database.transaction() as connection:
        await insert.execute(connection, ROWS)
        changed = await update.execute(connection, {"count": 9, "where_name": "a"})
        unchanged = await update.execute(connection, {"count": 9, "where_name": "gone"})
        found = await select.execute(connection, {"where_name": "b"})
        missing = await select.execute(connection, {"where_name": "gone"})
    fixed = HotStatement(things.update().values(count=5).where(things.c.name == sa.bindparam("where_name")))
    async with database.transaction() as connection:
        await fixed.execute(connection, {"where_name": "b"})
    assert (changed.rowcount, unchanged.rowcount) == (1, 0)
    assert found.first() is not None
    assert missing.first() is None
    assert {(row[0], row[4]) for row in await _stored(database)} == {("a", 9), ("b", 5)}


async def test_a_refused_row_raises_sqlalchemys_error_and_the_transaction_writes_nothing(
    database: Database,
) -> None:
    hot = HotStatement(things.insert())

    async def insert_a_twice() -> None:
        async with database.transaction() as connection:
            await hot.execute(connection, ROWS[0])
            await hot.execute(connection, [ROWS[1], ROWS[0]])

    with pytest.raises(IntegrityError, match="UNIQUE"):
        await insert_a_twice()
    assert await _stored(database) == []
    async with database.transaction() as connection:  # the kept connection goes on after the rollback
        await hot.execute(connection, ROWS)
    assert [row[0] for row in await _stored(database)] == ["a", "b"]


@pytest.mark.parametrize(
    ("statement", "parameters", "problem"),
    [
        (with_default.insert(), {"name": "x"}, "Python-side defaults"),
        (
            sa.select(things.c.seq).where(things.c.name.in_(sa.bindparam("names", expanding=True))),
            {},
            "expanding",
        ),
        (things.update().where(things.c.name == sa.bindparam("where_name")), {"count": 1}, "where_name"),
    ],
    ids=["column default", "expanding IN", "a value not given"],
)
async def test_a_statement_that_needs_sqlalchemys_execution_is_refused(
    database: Database, statement: Any, parameters: dict[str, Any], problem: str
) -> None:
    async with database.transaction() as connection:
        with pytest.raises(TypeError, match=problem):
            await HotStatement(statement).execute(connection, parameters)


async def test_sqlite_write_transactions_share_one_kept_connection_that_close_closes(
    database: Database,
) -> None:
    seen = []
    for _ in range(2):
        async with database.transaction() as connection:
            seen.append(connection)
    assert seen[0] is seen[1]
    await database.close()
    assert seen[0].closed


async def test_columns_whose_names_sqlalchemy_escapes_take_their_values(database: Database) -> None:
    odd = sa.Table("odd", sa.MetaData(), sa.Column("a.b", sa.JSON), sa.Column("x y", sa.Integer))
    async with database.engine.begin() as connection:
        await connection.run_sync(odd.metadata.create_all)
    async with database.transaction() as connection:
        await HotStatement(odd.insert()).execute(connection, {"a.b": {"k": 1}, "x y": 2})
    async with database.engine.connect() as connection:
        assert [tuple(row) for row in await connection.exec_driver_sql("SELECT * FROM odd")] == [
            ('{"k": 1}', 2)
        ]


async def test_a_failed_commit_leaves_nothing_for_the_next_transaction(database: Database) -> None:
    """A COMMIT that fails can leave sqlite3's transaction open on the kept connection: the next
    transaction on it would commit the failed one's rows with its own."""
    async with database.engine.begin() as connection:
        await connection.exec_driver_sql(
            "CREATE TABLE child (id INTEGER PRIMARY KEY,"
            " parent INTEGER REFERENCES things(seq) DEFERRABLE INITIALLY DEFERRED)"
        )
    insert = HotStatement(things.insert())

    async def orphan() -> None:
        async with database.transaction() as connection:
            await insert.execute(connection, ROWS[0])
            await connection.exec_driver_sql("INSERT INTO child VALUES (1, 99)")  # refused at COMMIT

    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        await orphan()
    async with database.transaction() as connection:
        await insert.execute(connection, ROWS[1])
    assert [row[0] for row in await _stored(database)] == ["b"]


async def test_a_hot_statement_cancelled_while_it_waits_for_the_lock_ends_cancelled(
    database: Database, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "hot.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    insert = HotStatement(things.insert())

    async def write() -> None:
        async with database.transaction() as connection:
            await insert.execute(connection, ROWS[0])

    writing = asyncio.ensure_future(write())
    try:
        done, _ = await asyncio.wait([writing], timeout=0.3)
        assert not done  # waiting for the lock, off the event loop
        writing.cancel()
    finally:
        other.rollback()  # the statement left on its thread now runs, and is rolled back with the rest
        other.close()
    with pytest.raises(asyncio.CancelledError):
        await writing
    async with database.transaction() as connection:
        await insert.execute(connection, ROWS[1])
    assert [row[0] for row in await _stored(database)] == ["b"]
