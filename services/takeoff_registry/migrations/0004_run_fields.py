"""Run tags, notes, group and job type; the config keys the launch set; run ids compared bytewise.

Revision ID: 0004
Revises: 0003

Every new column has a default, so existing runs read as untagged, ungrouped and with no read-only config
keys (their launch config was replaced at attach and cannot be told apart now). On PostgreSQL ``run_id``
takes the "C" collation, so the (project_id, run_id) index orders ids byte by byte as SQLite does and
serves ListRuns' ``id_prefix`` as a range scan whatever the database's locale.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import JsonText

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("registry_runs", sa.Column("tags", sa.Text, nullable=False, server_default=""))
    op.add_column("registry_runs", sa.Column("notes", sa.Text, nullable=False, server_default=""))
    op.add_column("registry_runs", sa.Column("run_group", sa.String(128), nullable=False, server_default=""))
    op.add_column("registry_runs", sa.Column("job_type", sa.String(64), nullable=False, server_default=""))
    op.add_column(
        "registry_runs", sa.Column("launch_config_keys", JsonText, nullable=False, server_default="[]")
    )
    op.create_index(
        "ix_registry_runs_project_id_run_group_seq", "registry_runs", ["project_id", "run_group", "seq"]
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE registry_runs ALTER COLUMN run_id TYPE VARCHAR(63) COLLATE "C"')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE registry_runs ALTER COLUMN run_id TYPE VARCHAR(63) COLLATE "default"')
    op.drop_index("ix_registry_runs_project_id_run_group_seq", "registry_runs")
    for column in ("launch_config_keys", "job_type", "run_group", "notes", "tags"):
        op.drop_column("registry_runs", column)
