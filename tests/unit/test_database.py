import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from takeoff_server.config import ConfigError
from takeoff_server.database import Database, async_database_url
from tests.postgres import assert_on_postgresql, postgres_url

FIRST_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String))


def downgrade():
    op.drop_table("{table}")
"""

SECOND_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("{table}", sa.Column("size", sa.Integer, nullable=True))


def downgrade():
    op.drop_column("{table}", "size")
"""


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    service = f"probe{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        db = Database.for_service(service, tmp_path / "home", None, migrations=migrations)
    else:
        db = Database(service, postgres_url(), migrations=migrations)
        await assert_on_postgresql(db.engine)
    yield db
    async with db.engine.begin() as connection:
        await connection.execute(sa.text(f"DROP TABLE IF EXISTS {service}_things"))
        await connection.execute(sa.text(f"DROP TABLE IF EXISTS {db.version_table}"))
    await db.close()


async def test_migrations_apply_in_order_and_only_once(database: Database) -> None:
    assert database.migrations is not None
    table = f"{database.service}_things"
    (database.migrations / "0001_things.py").write_text(FIRST_REVISION.format(table=table))

    assert await database.migrate() == "0001"
    async with database.engine.begin() as connection:
        await connection.execute(sa.text(f"INSERT INTO {table} (name) VALUES ('kept')"))

    (database.migrations / "0002_size.py").write_text(SECOND_REVISION.format(table=table))
    assert await database.migrate() == "0002"
    assert await database.migrate() == "0002"  # idempotent: nothing left to apply

    async with database.engine.connect() as connection:
        rows = (await connection.execute(sa.text(f"SELECT name, size FROM {table}"))).all()
    assert [tuple(row) for row in rows] == [("kept", None)]


async def test_each_service_has_its_own_version_table(database: Database) -> None:
    assert database.version_table == f"{database.service}_schema_version"
    assert await database.schema_version() is None
    await database.migrate()
    async with database.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    assert database.version_table in tables


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    db = Database.for_service("probe", tmp_path / "home", None)
    try:
        async with db.engine.connect() as connection:
            mode = (await connection.execute(sa.text("PRAGMA journal_mode"))).scalar_one()
    finally:
        await db.close()
    assert mode == "wal"
    assert (tmp_path / "home" / "probe.db").exists()


def test_urls_map_to_async_drivers() -> None:
    assert async_database_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    assert async_database_url("postgresql://u:p@db:5432/t") == "postgresql+psycopg://u:p@db:5432/t"
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        async_database_url("mysql://u@db/t")
