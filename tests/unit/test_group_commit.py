"""Group commit on PostgreSQL (libs/takeoff_server/group_commit.py): two writers' transactions that lock the
same rows in opposite orders deadlock, PostgreSQL aborts one of them, and that batch is run again whole:
both writers' changes are committed, none is lost to the deadlock."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from takeoff_server.database import Database
from takeoff_server.group_commit import Batch, GroupCommitter, Work
from tests.postgres import assert_on_postgresql, postgres_schema_url

pytestmark = pytest.mark.postgres


async def test_a_batch_postgresql_aborts_to_break_a_deadlock_is_written_again() -> None:
    with postgres_schema_url("group_commit") as url:
        database = Database("group_commit", url)
        engine = database.engine
        try:
            await assert_on_postgresql(engine)
            async with engine.begin() as connection:
                await connection.execute(sa.text("CREATE TABLE counters (id TEXT PRIMARY KEY, hits INTEGER)"))
                await connection.execute(sa.text("INSERT INTO counters VALUES ('a', 0), ('b', 0)"))
            first_locked, second_locked = asyncio.Event(), asyncio.Event()
            tries = {"a-then-b": 0, "b-then-a": 0}

            def crossing(first: str, second: str, mine: asyncio.Event, theirs: asyncio.Event) -> Work:
                async def work(batch: Batch) -> None:
                    tries[f"{first}-then-{second}"] += 1
                    bump = sa.text("UPDATE counters SET hits = hits + 1 WHERE id = :id")
                    await batch.execute(bump, {"id": first})
                    mine.set()
                    await theirs.wait()  # each holds its first row while it asks for the other's
                    await batch.execute(bump, {"id": second})

                return work

            # Two committers, as two replicas have: each batch is a transaction on a connection of its own.
            results = await asyncio.gather(
                GroupCommitter(database).commit(crossing("a", "b", first_locked, second_locked)),
                GroupCommitter(database).commit(crossing("b", "a", second_locked, first_locked)),
                return_exceptions=True,
            )

            assert list(results) == [None, None]
            async with engine.connect() as connection:
                rows = (await connection.execute(sa.text("SELECT id, hits FROM counters"))).all()
            hits = {str(row[0]): int(row[1]) for row in rows}
            assert hits == {"a": 2, "b": 2}  # each batch's two writes, once each
            assert sorted(tries.values()) == [1, 2]  # the deadlock's victim was run again, the other once
        finally:
            await database.close()
