"""Group commit (libs/takeoff_server/group_commit.py): a change the database refuses (a constraint it
violates) fails alone, while the changes that shared its batch commit; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from takeoff_server.database import async_database_url
from takeoff_server.group_commit import GroupCommitter, Work
from tests.postgres import postgres_schema_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        made = create_async_engine(async_database_url(f"sqlite:///{tmp_path / 'batch.db'}"))
        try:
            yield made
        finally:
            await made.dispose()
        return
    with postgres_schema_url("group_commit_isolation") as url:
        made = create_async_engine(async_database_url(url))
        try:
            yield made
        finally:
            await made.dispose()


async def test_a_change_the_database_refuses_fails_alone_and_its_batch_commits(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE names (name TEXT PRIMARY KEY)"))
        await connection.execute(sa.text("INSERT INTO names VALUES ('taken')"))
    runs: dict[str, int] = {}

    def insert(name: str) -> Work:
        async def work(connection: AsyncConnection) -> str:
            runs[name] = runs.get(name, 0) + 1
            await connection.execute(sa.text("INSERT INTO names VALUES (:name)"), {"name": name})
            return name

        return work

    committer = GroupCommitter(engine)
    # Submitted in one turn of the event loop: one batch.
    results = await asyncio.gather(
        *(committer.commit(insert(name)) for name in ("a", "taken", "b")), return_exceptions=True
    )

    assert results[0] == "a"
    assert isinstance(results[1], IntegrityError)
    assert results[2] == "b"
    assert runs == {"a": 2, "taken": 2, "b": 1}  # the batch ran up to the refused change, then each alone
    async with engine.connect() as connection:
        names = sorted((await connection.execute(sa.text("SELECT name FROM names"))).scalars())
    assert names == ["a", "b", "taken"]
