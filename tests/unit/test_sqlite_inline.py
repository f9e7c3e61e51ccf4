"""SQLite statements on the event loop's thread (takeoff_server.sqlite_inline, docs/design.md §9
"Databases"): locks, cancellation, termination and results.

Each test holds a lock with a plain sqlite3 connection (another "process") and shows where the waiting
happens: off the event loop, with the loop still answering (a wait on the loop's thread would hold back
``asyncio.wait(..., timeout=...)`` until SQLite gave up). The three under "found by a review" failed
before their fixes.
"""

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc

from takeoff_server.database import Database
from takeoff_server.sqlite_inline import SQLITE_BUSY_SNAPSHOT, InlineConnection

WAIT_MS = 1500
"""The busy timeout of connections made here directly: long enough to see a wait, short enough to end."""


def _external(path: Path) -> sqlite3.Connection:
    """Another process's connection, in autocommit mode (transactions explicit)."""
    return sqlite3.connect(path, isolation_level=None, timeout=5)


async def _connect(path: Path, busy_timeout_ms: int = WAIT_MS) -> InlineConnection:
    return await InlineConnection.connect(str(path), busy_timeout_ms)()


async def _pending(task: Awaitable[Any], seconds: float = 0.3) -> None:
    """``task`` is still waiting after ``seconds``, during which the loop went on running: a wait that held
    the loop would have run to its end (the lock is held throughout, so it fails) before this could look."""
    done, _ = await asyncio.wait([asyncio.ensure_future(task)], timeout=seconds)
    assert not done


async def _rows(connection: InlineConnection, sql: str) -> list[Any]:
    cursor = await connection.execute(sql)
    rows = await cursor.fetchall()
    await cursor.close()
    return list(rows)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A service database (WAL) with ``t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)``."""
    database = Database.for_service("probe", tmp_path, None)
    async with database.engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def holder(tmp_path: Path, db: Database) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock of the service database."""
    connection = _external(tmp_path / "probe.db")
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    """A rollback-journal (not WAL) database with ``t (v TEXT)``: there a reader can lock out a COMMIT."""
    path = tmp_path / "journal.db"
    setup = _external(path)
    setup.execute("PRAGMA journal_mode=DELETE")
    setup.execute("CREATE TABLE t (v TEXT)")
    setup.close()
    return path


async def _insert(db: Database, value: str) -> None:
    async with db.engine.begin() as connection:
        await connection.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": value})


async def _values(db: Database) -> list[str]:
    async with db.engine.connect() as connection:
        return list((await connection.execute(sa.text("SELECT v FROM t ORDER BY v"))).scalars())


# The module's promises -------------------------------------------------------------------------------


async def test_a_write_waits_for_a_locked_database_off_the_event_loop(
    db: Database, holder: sqlite3.Connection
) -> None:
    """Statements run on the loop's thread (sqlite_inline), but never wait there: a write that finds the
    database locked waits on a worker thread, and the loop goes on (here: reads) until the lock is gone."""
    write = asyncio.create_task(_insert(db, "after"))
    for _ in range(20):  # the loop answers while the write waits: a wait on it would hold these back
        assert await _values(db) == []
    done, _ = await asyncio.wait([write], timeout=0.5)
    assert not done
    holder.execute("COMMIT")
    await asyncio.wait_for(write, 10)
    assert await _values(db) == ["after"]


async def test_a_write_whose_caller_gave_up_while_it_waited_leaves_the_database_usable(
    db: Database, holder: sqlite3.Connection
) -> None:
    """A caller cancelled while its statement waits for the lock on a worker thread: the connection is
    used again only once that statement is over, the transaction is not committed, and no lock is kept."""
    write = asyncio.create_task(_insert(db, "abandoned"))
    done, _ = await asyncio.wait([write], timeout=0.5)
    assert not done
    write.cancel()
    holder.execute("COMMIT")
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(write, 10)
    await asyncio.wait_for(_insert(db, "next"), 10)
    assert await _values(db) == ["next"]


# Found by a review, fixed ------------------------------------------------------------------------------


async def test_an_autocommit_connection_can_be_used(db: Database) -> None:
    async with db.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(sa.text("INSERT INTO t (v) VALUES ('a')"))
    assert await _values(db) == ["a"]


async def test_a_commit_is_not_queued_behind_the_writers_waiting_for_it(tmp_path: Path) -> None:
    """One connection holds the write lock; as many writers as the worker pool has threads wait for it
    (several engines of one process: 15 connections each). Its COMMIT must not wait behind them: they
    would time out ("database is locked") for a lock that the commit would have freed at once."""
    path = tmp_path / "many.db"
    setup = _external(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (v TEXT)")
    setup.close()
    owner = await _connect(path)
    waiters = [await _connect(path) for _ in range(16)]
    try:
        await owner.execute("INSERT INTO t VALUES ('owner')")  # holds the write lock

        async def write(waiter: InlineConnection, value: str) -> None:
            await waiter.execute(f"INSERT INTO t VALUES ('{value}')")
            await waiter.commit()

        writes = [asyncio.create_task(write(w, f"w{i}")) for i, w in enumerate(waiters)]
        await _pending(asyncio.gather(*writes))
        assert all(w._behind is not None for w in waiters)  # all waiting on worker threads
        await asyncio.wait_for(asyncio.shield(owner.commit()), 5)
        # A commit queued behind them would free the lock only once they had given up ("database is locked").
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert [o for o in outcomes if isinstance(o, BaseException)] == []
    finally:
        for connection in [owner, *waiters]:
            await connection.close()


class _TakesTheLock:
    """A parameter that, as SQLite binds it, lets another connection take the write lock (once)."""

    def __init__(self, value: str, holder: sqlite3.Connection) -> None:
        self.value = value
        self.holder: sqlite3.Connection | None = holder

    def __conform__(self, protocol: object) -> str:
        if self.holder is not None:
            self.holder.execute("BEGIN IMMEDIATE")
            self.holder = None
        return self.value


async def test_an_autocommit_executemany_locked_out_midway_does_not_repeat_its_first_rows(
    tmp_path: Path, db: Database
) -> None:
    """With no transaction around it each row commits by itself; a lock taken between rows must not make
    the rows already written run again (here: a UNIQUE violation for a batch without duplicates)."""
    connection = await _connect(tmp_path / "probe.db")
    connection.raw.isolation_level = None  # what SQLAlchemy's AUTOCOMMIT sets on a pysqlite connection
    # Used by the parameter as SQLite binds it, on whichever thread runs the executemany.
    other = sqlite3.connect(tmp_path / "probe.db", isolation_level=None, timeout=5, check_same_thread=False)
    try:
        cursor = await connection.cursor()
        many = asyncio.create_task(
            cursor.executemany("INSERT INTO t (v) VALUES (?)", [("a",), (_TakesTheLock("b", other),)])
        )
        await _pending(many)
        other.execute("COMMIT")
        await asyncio.wait_for(many, 5)
        assert await _rows(connection, "SELECT v FROM t ORDER BY v") == [("a",), ("b",)]
    finally:
        other.close()
        await connection.close()


# Checks that pass ---------------------------------------------------------------------------------------


async def test_a_deferred_transaction_whose_snapshot_is_stale_fails_at_once(
    tmp_path: Path, db: Database
) -> None:
    """SQLITE_BUSY_SNAPSHOT: waiting cannot help, so the write fails at once, on the loop's thread."""
    connection = await _connect(tmp_path / "probe.db")
    other = _external(tmp_path / "probe.db")
    try:
        await connection.execute("BEGIN")
        assert await _rows(connection, "SELECT count(*) FROM t") == [(0,)]
        other.execute("INSERT INTO t (v) VALUES ('other')")
        with pytest.raises(sqlite3.OperationalError) as raised:
            await asyncio.wait_for(connection.execute("INSERT INTO t (v) VALUES ('mine')"), 1)
        assert raised.value.sqlite_errorcode == SQLITE_BUSY_SNAPSHOT
        assert connection._behind is None  # never sent to a worker thread
        await connection.rollback()
        await connection.execute("INSERT INTO t (v) VALUES ('mine')")
        await connection.commit()
        assert await _rows(connection, "SELECT v FROM t ORDER BY v") == [("mine",), ("other",)]
    finally:
        other.close()
        await connection.close()


async def test_a_deferred_transaction_that_finds_the_lock_held_fails_without_the_busy_timeout(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    """A read transaction cannot wait for the write lock (SQLite does not call the busy handler there):
    the write fails quickly instead of hanging for the busy timeout or retrying."""
    connection = await _connect(tmp_path / "probe.db", busy_timeout_ms=10_000)
    try:
        await connection.execute("BEGIN")
        await _rows(connection, "SELECT count(*) FROM t")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await asyncio.wait_for(connection.execute("INSERT INTO t (v) VALUES ('mine')"), 2)
        await connection.rollback()
    finally:
        await connection.close()


async def test_begin_immediate_waits_for_the_lock_off_the_loop(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    connection = await _connect(tmp_path / "probe.db")
    try:
        begin = asyncio.create_task(connection.execute("BEGIN IMMEDIATE"))
        await _pending(begin)
        holder.execute("COMMIT")
        await asyncio.wait_for(begin, 5)
        await connection.execute("INSERT INTO t (v) VALUES ('x')")
        await connection.commit()
        assert await _rows(connection, "PRAGMA busy_timeout") == [(0,)]
    finally:
        await connection.close()


async def test_a_commit_locked_out_by_a_reader_waits_off_the_loop(journal_path: Path) -> None:
    """Rollback-journal mode: COMMIT needs the readers gone, and waits for them on a worker thread."""
    connection = await _connect(journal_path)
    reader = _external(journal_path)
    try:
        await connection.execute("INSERT INTO t VALUES ('x')")
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchall() == [(0,)]
        commit = asyncio.create_task(connection.commit())
        await _pending(commit)
        reader.execute("COMMIT")
        await asyncio.wait_for(commit, 5)
        assert reader.execute("SELECT v FROM t").fetchall() == [("x",)]
        assert await _rows(connection, "PRAGMA busy_timeout") == [(0,)]
    finally:
        reader.close()
        await connection.close()


async def test_a_commit_whose_caller_gave_up_still_commits_and_holds_no_lock(journal_path: Path) -> None:
    connection = await _connect(journal_path)
    reader = _external(journal_path)
    try:
        await connection.execute("INSERT INTO t VALUES ('x')")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()
        commit = asyncio.create_task(connection.commit())
        await _pending(commit)
        commit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commit
        reader.execute("COMMIT")
        # The next operation waits for the commit left on the worker thread, then sees its outcome.
        assert await asyncio.wait_for(_rows(connection, "SELECT v FROM t"), 5) == [("x",)]
        assert not connection.raw.in_transaction
        reader.execute("BEGIN IMMEDIATE")  # no lock left behind
        reader.execute("ROLLBACK")
    finally:
        reader.close()
        await connection.close()


async def test_a_read_locked_out_waits_off_the_loop_and_returns_its_rows(journal_path: Path) -> None:
    writer = _external(journal_path)
    writer.execute("INSERT INTO t VALUES ('before')")
    connection = await _connect(journal_path)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        read = asyncio.create_task(_rows(connection, "SELECT v FROM t"))
        await _pending(read)
        writer.execute("COMMIT")
        assert await asyncio.wait_for(read, 5) == [("before",)]
    finally:
        writer.close()
        await connection.close()


async def test_executemany_of_a_generator_and_returning_survive_a_locked_database(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    connection = await _connect(tmp_path / "probe.db")
    try:
        cursor = await connection.cursor()
        many = asyncio.create_task(cursor.executemany("INSERT INTO t (v) VALUES (?)", ((v,) for v in "abc")))
        await _pending(many)
        holder.execute("COMMIT")
        await asyncio.wait_for(many, 5)
        assert cursor.rowcount == 3
        await connection.commit()
        holder.execute("BEGIN IMMEDIATE")
        returning = asyncio.create_task(_rows(connection, "INSERT INTO t (v) VALUES ('d') RETURNING id, v"))
        await _pending(returning)
        holder.execute("COMMIT")
        assert await asyncio.wait_for(returning, 5) == [(4, "d")]
        await connection.commit()
        assert await _rows(connection, "SELECT v FROM t ORDER BY id") == [("a",), ("b",), ("c",), ("d",)]
    finally:
        await connection.close()


async def test_an_error_after_a_wait_is_sqlites_and_leaves_the_connection_usable(
    tmp_path: Path, db: Database, holder: sqlite3.Connection
) -> None:
    holder.execute("INSERT INTO t (v) VALUES ('dup')")
    write = asyncio.create_task(_insert(db, "dup"))
    await _pending(write)
    holder.execute("COMMIT")
    with pytest.raises(exc.IntegrityError):
        await asyncio.wait_for(write, 5)
    with pytest.raises(exc.OperationalError, match="syntax"):
        async with db.engine.connect() as connection:
            await connection.execute(sa.text("SELEC 1"))
    await asyncio.wait_for(_insert(db, "next"), 5)
    assert await _values(db) == ["dup", "next"]
    async with db.engine.connect() as connection:
        assert (await connection.execute(sa.text("PRAGMA busy_timeout"))).scalar_one() == 0


async def test_a_locked_write_after_a_wait_still_does_not_hold_the_loop(
    db: Database, holder: sqlite3.Connection
) -> None:
    first = asyncio.create_task(_insert(db, "first"))
    await _pending(first)
    holder.execute("COMMIT")
    await asyncio.wait_for(first, 5)
    holder.execute("BEGIN IMMEDIATE")
    second = asyncio.create_task(_insert(db, "second"))  # the same pooled connection
    await _pending(second)
    holder.execute("COMMIT")
    await asyncio.wait_for(second, 5)
    assert await _values(db) == ["first", "second"]


async def test_two_writers_of_one_engine_both_complete(db: Database) -> None:
    go_on = asyncio.Event()
    holding = asyncio.Event()

    async def slow() -> None:
        async with db.engine.begin() as connection:
            await connection.execute(sa.text("INSERT INTO t (v) VALUES ('slow')"))
            holding.set()
            await go_on.wait()

    first = asyncio.create_task(slow())
    await asyncio.wait_for(holding.wait(), 5)
    second = asyncio.create_task(_insert(db, "fast"))
    await _pending(second)
    go_on.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert await _values(db) == ["fast", "slow"]


async def test_cancelled_twice_then_the_next_operation_runs_after_the_first(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    """Cancelled on the worker thread, then cancelled again while catching up: the second statement
    never ran, and the third runs after the first (in its transaction, as the connection was left)."""
    connection = await _connect(tmp_path / "probe.db")
    try:
        first = asyncio.create_task(connection.execute("INSERT INTO t (v) VALUES ('first')"))
        await _pending(first)
        first.cancel()
        second = asyncio.create_task(connection.execute("INSERT INTO t (v) VALUES ('second')"))
        await _pending(second)
        second.cancel()
        holder.execute("COMMIT")
        third = await asyncio.wait_for(connection.execute("SELECT v FROM t"), 5)
        assert await third.fetchall() == [("first",)]
        assert connection.raw.in_transaction
        await connection.rollback()
        for task in (first, second):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await connection.close()


async def test_sqlalchemy_cancelled_again_while_closing_leaves_no_lock_and_no_commit(
    db: Database, holder: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while its write waits on a worker thread makes SQLAlchemy terminate the
    connection; cancelled again during that graceful close, SQLAlchemy calls ``stop()``."""
    closing = asyncio.Event()
    close = InlineConnection.close

    async def noted_close(self: InlineConnection) -> None:
        closing.set()
        await close(self)

    monkeypatch.setattr(InlineConnection, "close", noted_close)
    write = asyncio.create_task(_insert(db, "abandoned"))
    await _pending(write)
    write.cancel()
    await asyncio.wait_for(closing.wait(), 5)
    write.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(write, 5)
    holder.execute("COMMIT")
    await asyncio.wait_for(_insert(db, "next"), 5)
    assert await _values(db) == ["next"]


async def test_stop_while_waiting_closes_after_the_wait_without_committing(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    connection = await _connect(tmp_path / "probe.db")
    write = asyncio.create_task(connection.execute("INSERT INTO t (v) VALUES ('x')"))
    await _pending(write)
    connection.stop()
    holder.execute("COMMIT")
    await asyncio.wait_for(write, 5)
    check = _external(tmp_path / "probe.db")
    try:
        assert not _locked_for_write(check)  # closed (rolled back) once the write was over
        assert check.execute("SELECT v FROM t").fetchall() == []
    finally:
        check.close()
    with pytest.raises(sqlite3.ProgrammingError):
        connection.raw.execute("SELECT 1")


def _locked_for_write(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return True
    connection.execute("ROLLBACK")
    return False


async def test_results_report_rows_counts_and_ids(db: Database) -> None:
    async with db.engine.begin() as connection:
        inserted = await connection.execute(sa.text("INSERT INTO t (v) VALUES ('a')"))
        assert inserted.lastrowid == 1
        await connection.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "b"}, {"v": "c"}])
        updated = await connection.execute(sa.text("UPDATE t SET v = v || '!' WHERE v != 'a'"))
        assert updated.rowcount == 2
        assert (await connection.execute(sa.text("SELECT v FROM t WHERE v = 'none'"))).all() == []
        result = await connection.stream(sa.text("SELECT v FROM t ORDER BY id"))
        assert [list(p) async for p in result.partitions(2)] == [[("a",), ("b!",)], [("c!",)]]
        returned = await connection.execute(sa.text("INSERT INTO t (v) VALUES ('d') RETURNING id"))
        assert returned.scalar_one() == 4
