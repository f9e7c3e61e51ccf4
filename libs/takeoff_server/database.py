"""The database a service owns: an async SQLAlchemy engine, sessions, and versioned migrations.

SQLite (one WAL-mode file per service under ``TAKEOFF_HOME``) is the embedded default; a
``postgresql://`` URL selects PostgreSQL through psycopg 3. Several services may share one PostgreSQL
database: each keeps its own tables and its own migration version table, ``{service}_schema_version``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from takeoff_server.config import ConfigError, ServerSettings
from takeoff_server.sqlite_inline import InlineConnection

_SHARED_MIGRATION_ENV = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 10_000


def async_database_url(url: str) -> str:
    """Map a user's URL onto the async driver Takeoff uses for it."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(f"unsupported database {backend!r}: use a sqlite:// or postgresql:// URL")


def libpq_conninfo(url: str, query: Mapping[str, str] | None = None) -> str:
    """A ``postgresql://`` (or ``postgresql+psycopg://``) URL in the form libpq takes, for the connections a
    service opens with psycopg itself (locks, LISTEN, a held connection), with ``query`` added to it."""
    parsed = make_url(url).set(drivername="postgresql")
    return (parsed.update_query_dict(dict(query)) if query else parsed).render_as_string(hide_password=False)


SqliteSynchronous = Literal["NORMAL", "FULL"]


def _sqlite_tuner(synchronous: SqliteSynchronous) -> Callable[[Any, Any], None]:
    def tune(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the writer. In WAL mode a commit survives a process kill with either
        # setting; NORMAL syncs only at checkpoints, so power loss can drop the last commits, while FULL
        # syncs the WAL at every commit (one fsync per group commit, not per change).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return tune


class Database:
    """One service's database: ``async with db.session() as s`` for work, ``await db.migrate()`` at start."""

    def __init__(
        self,
        service: str,
        url: str,
        *,
        migrations: Path | None = None,
        sqlite_synchronous: SqliteSynchronous = "NORMAL",
    ) -> None:
        self.service = service
        self.url = async_database_url(url)
        self.migrations = migrations
        if self.url.startswith("sqlite"):
            # A SQLite file's pooled connection cannot have been dropped: no ping, which would cost every
            # checkout a statement.
            path = make_url(self.url).database or ""
            self.engine: AsyncEngine = create_async_engine(
                self.url, async_creator=InlineConnection.connect(path, SQLITE_BUSY_TIMEOUT_MS)
            )
            event.listen(self.engine.sync_engine, "connect", _sqlite_tuner(sqlite_synchronous))
        else:
            self.engine = create_async_engine(self.url, pool_pre_ping=True)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        self._writer: AsyncConnection | None = None
        self._writing = asyncio.Lock()

    @classmethod
    def for_service(
        cls,
        service: str,
        home: Path,
        database_url: str | None,
        *,
        migrations: Path | None = None,
        sqlite_synchronous: SqliteSynchronous = "NORMAL",
    ) -> Database:
        """The configured database, or ``{home}/{service}.db`` when none is configured."""
        if database_url is None:
            home.mkdir(parents=True, exist_ok=True)
            database_url = f"sqlite:///{home / f'{service}.db'}"
        return cls(service, database_url, migrations=migrations, sqlite_synchronous=sqlite_synchronous)

    @property
    def version_table(self) -> str:
        return f"{self.service}_schema_version"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction for writes, committed when the block ends (rolled back if it raises).

        On SQLite each one runs on a connection kept for them, one at a time: a SQLite file has one writer
        at a time anyway, and a pool's checkout, reset and check-in cost a group commit's transaction about
        0.25 ms, more than its statements. Elsewhere it is the pool's, pinged at checkout: a server's
        connection can drop, and a kept one would fail the first transaction after."""
        if not self.url.startswith("sqlite"):
            async with self.engine.begin() as connection:
                yield connection
            return
        async with self._writing:
            if self._writer is None:
                self._writer = await self.engine.connect()
            try:
                async with self._writer.begin():
                    yield self._writer
            except BaseException:
                # A COMMIT or ROLLBACK that failed can leave sqlite3's transaction open, and the next one
                # would commit it: the pool's check-in rolls it back, and a new connection takes over.
                writer, self._writer = self._writer, None
                await asyncio.shield(writer.close())
                raise

    async def migrate(self) -> str | None:
        """Bring the schema to the newest revision in ``migrations``; return that revision."""
        if self.migrations is None:
            return None
        async with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together on a fresh database: one migrates, the others wait for its
                # commit and then find the schema current (the lock ends with the transaction).
                key = int.from_bytes(
                    hashlib.sha256(self.version_table.encode()).digest()[:8], "big", signed=True
                )
                await connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            await connection.run_sync(self._upgrade)
        return await self.schema_version()

    async def schema_version(self) -> str | None:
        async with self.engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(
                    sync, opts={"version_table": self.version_table}
                ).get_current_revision()
            )

    def _upgrade(self, connection: Connection) -> None:
        config = AlembicConfig()
        config.set_main_option("path_separator", "os")
        config.set_main_option("script_location", str(_SHARED_MIGRATION_ENV))
        config.set_main_option("version_locations", str(self.migrations))
        config.attributes["connection"] = connection
        config.attributes["version_table"] = self.version_table
        command.upgrade(config, "head")

    async def close(self) -> None:
        async with self._writing:  # after the transaction under way, if any
            if self._writer is not None:
                await self._writer.close()
                self._writer = None
        await self.engine.dispose()


async def open_service_database(
    service: str,
    settings: ServerSettings,
    resources: AsyncExitStack,
    *,
    migrations: Path,
    sqlite_synchronous: SqliteSynchronous = "NORMAL",
) -> Database:
    """Open and migrate the service's configured database; ``resources`` closes it."""
    database = Database.for_service(
        service,
        settings.home,
        settings.database_url,
        migrations=migrations,
        sqlite_synchronous=sqlite_synchronous,
    )
    resources.push_async_callback(database.close)
    await database.migrate()
    return database
