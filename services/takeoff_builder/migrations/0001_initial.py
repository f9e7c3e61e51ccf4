"""The builder's first schema: builds, their log lines, request ids.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "builder_builds",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("job", sa.String(), nullable=False),
        sa.Column("job_version", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("push", sa.Boolean(), nullable=False),
        sa.Column("no_cache", sa.Boolean(), nullable=False),
        sa.Column("run", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("environment_key", sa.String(), nullable=False),
        sa.Column("build_key", sa.String(), nullable=False),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("cache_detail", sa.String(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("failure_reason", sa.String(), nullable=True),
        sa.Column("failure_message", sa.String(), nullable=False),
        sa.Column("failure_log_tail", sa.JSON(), nullable=False),
        sa.Column("log_line_count", sa.Integer(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("start_time", UtcDateTime(), nullable=True),
        sa.Column("end_time", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index(op.f("ix_builder_builds_id"), "builder_builds", ["id"], unique=True)
    op.create_index(op.f("ix_builder_builds_job"), "builder_builds", ["job"], unique=False)
    op.create_index(op.f("ix_builder_builds_job_version"), "builder_builds", ["job_version"], unique=False)
    op.create_index(op.f("ix_builder_builds_state"), "builder_builds", ["state"], unique=False)
    op.create_table(
        "builder_build_logs",
        sa.Column("build_id", sa.String(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("build_id", "line"),
    )
    op.create_table(
        "builder_request_ids",
        sa.Column("scope", sa.String(length=256), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "request_id"),
    )


def downgrade() -> None:
    for table in ("builder_request_ids", "builder_build_logs", "builder_builds"):
        op.drop_table(table)
