"""Group commit (libs/takeoff_server/group_commit.py): a change the database refuses (a constraint it
violates, by a statement or by a row it appended) fails alone, while the changes that shared its batch
commit; appended rows are in place before a statement that may see them; on SQLite (the services' engine,
whose hot statements sqlite3 runs itself) and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from takeoff_server.database import Database
from takeoff_server.group_commit import Batch, GroupCommitter, Work
from takeoff_server.hot_statements import HotStatement
from tests.postgres import postgres_schema_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        made = Database.for_service("batch", tmp_path, None)
        try:
            yield made
        finally:
            await made.close()
        return
    with postgres_schema_url("group_commit_isolation") as url:
        made = Database("group_commit_isolation", url)
        try:
            yield made
        finally:
            await made.close()


INSERT_NAME = HotStatement(sa.table("names", sa.column("name")).insert())


async def _names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return sorted((await connection.execute(sa.text("SELECT name FROM names"))).scalars())


@pytest.mark.parametrize(
    ("appended", "runs_expected"),
    [
        # The batch ran up to the refused statement, then each change alone.
        (False, {"a": 2, "taken": 2, "b": 1}),
        # Every change ran, then the appended rows were refused together, then each change alone.
        (True, {"a": 2, "taken": 2, "b": 2}),
    ],
    ids=["executed", "appended"],
)
async def test_a_change_the_database_refuses_fails_alone_and_its_batch_commits(
    database: Database, appended: bool, runs_expected: dict[str, int]
) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE names (name TEXT PRIMARY KEY)"))
        await connection.execute(sa.text("INSERT INTO names VALUES ('taken')"))
    runs: dict[str, int] = {}

    def insert(name: str) -> Work:
        async def work(batch: Batch) -> str:
            runs[name] = runs.get(name, 0) + 1
            if appended:
                batch.append(INSERT_NAME, [{"name": name}])
            else:
                await batch.execute(INSERT_NAME, {"name": name})
            return name

        return work

    committer = GroupCommitter(database)
    # Submitted in one turn of the event loop: one batch.
    results = await asyncio.gather(
        *(committer.commit(insert(name)) for name in ("a", "taken", "b")), return_exceptions=True
    )

    assert results[0] == "a"
    assert isinstance(results[1], IntegrityError)
    assert results[2] == "b"
    assert runs == runs_expected
    assert await _names(database.engine) == ["a", "b", "taken"]


async def test_appended_rows_are_in_place_before_a_statement_that_may_see_them(database: Database) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE names (name TEXT PRIMARY KEY)"))
    count = sa.text("SELECT count(*) FROM names")
    counted: dict[str, int] = {}

    async def appends(batch: Batch) -> None:
        batch.append(INSERT_NAME, [{"name": "a"}, {"name": "b"}])

    async def counts(batch: Batch) -> None:
        counted["past the appends"] = (await batch.execute(count, past_appends=True)).scalar_one()
        counted["after them"] = (await batch.execute(count)).scalar_one()
        batch.append(INSERT_NAME, [{"name": "c"}])

    committer = GroupCommitter(database)
    await asyncio.gather(committer.commit(appends), committer.commit(counts))  # one batch

    assert counted == {"past the appends": 0, "after them": 2}
    assert await _names(database.engine) == [
        "a",
        "b",
        "c",
    ]  # the last, appended after every statement, before the commit
