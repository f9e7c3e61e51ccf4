"""CPU of one small SQLite transaction through a service's engine: Takeoff's (statements on the event loop's
thread, ``takeoff_server.sqlite_inline``) against SQLAlchemy's stock aiosqlite one (a thread hand-off per
call), both in WAL mode with ``synchronous=FULL``.

Two transactions, each timed over ``--count`` runs after a warm-up, by the process's CPU time and by the
wall clock: a read (``SELECT 1`` on a pooled connection) and a write (an INSERT and an UPDATE, then the
commit). Prints JSON and a table.

    python bench/sqlite_calls.py [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from takeoff_server.database import Database, async_database_url


def _stock_engine(path: Path) -> AsyncEngine:
    engine = create_async_engine(async_database_url(f"sqlite:///{path}"))

    def tune(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    event.listen(engine.sync_engine, "connect", tune)
    return engine


async def _per_call(transaction: Callable[[], Awaitable[None]], count: int) -> dict[str, float]:
    for _ in range(count // 10):
        await transaction()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await transaction()
    return {
        "cpu_us": round((time.process_time() - cpu) / count * 1e6, 1),
        "wall_us": round((time.perf_counter() - wall) / count * 1e6, 1),
    }


async def measure(engine: AsyncEngine, count: int) -> dict[str, dict[str, float]]:
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))

    async def read() -> None:
        async with engine.connect() as connection:
            (await connection.execute(sa.text("SELECT 1"))).all()

    async def write() -> None:
        async with engine.begin() as connection:
            await connection.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": "x"})
            await connection.execute(sa.text("UPDATE t SET v = 'y' WHERE id = 1"))

    try:
        return {"read": await _per_call(read, count), "write": await _per_call(write, count)}
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as directory:
        home = Path(directory)
        engines = {
            "takeoff (inline)": Database(
                "bench", f"sqlite:///{home / 'inline.db'}", sqlite_synchronous="FULL"
            ).engine,
            "aiosqlite": _stock_engine(home / "stock.db"),
        }
        results = {name: await measure(engine, args.count) for name, engine in engines.items()}
    print(json.dumps(results, indent=2))
    print(f"\n{'driver':20} {'transaction':12} {'cpu µs':>8} {'wall µs':>8}")
    for name, figures in results.items():
        for transaction, figure in figures.items():
            print(f"{name:20} {transaction:12} {figure['cpu_us']:8.1f} {figure['wall_us']:8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
