"""The registry's first schema: projects, jobs, versions, aliases, artifacts, runs and their chunks.

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import JsonText, UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_projects",
        sa.Column("project_id", sa.String(63), primary_key=True),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_table(
        "registry_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), nullable=False),
        sa.Column("job_id", sa.String(63), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("version_count", sa.Integer, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("update_time", UtcDateTime, nullable=False),
        sa.UniqueConstraint("project_id", "job_id"),
    )
    op.create_table(
        "registry_job_versions",
        sa.Column(
            "job_pk", sa.Integer, sa.ForeignKey("registry_jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("content", JsonText, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_table(
        "registry_job_aliases",
        sa.Column(
            "job_pk", sa.Integer, sa.ForeignKey("registry_jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("alias", sa.String(63), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk", "version"],
            ["registry_job_versions.job_pk", "registry_job_versions.version"],
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "registry_artifacts",
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), primary_key=True
        ),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_table(
        "registry_runs",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), nullable=False),
        sa.Column("run_id", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
        sa.Column("job_version", sa.String(220), nullable=False),
        sa.Column("queue_item", sa.String(230), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("config", JsonText, nullable=False),
        sa.Column("summary", JsonText, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("start_time", UtcDateTime, nullable=True),
        sa.Column("end_time", UtcDateTime, nullable=True),
        sa.Column("update_time", UtcDateTime, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("history_length", sa.BigInteger, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("metric_keys", JsonText, nullable=False),
        sa.Column("log_line_count", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("project_id", "run_id"),
    )
    op.create_index("ix_registry_runs_project_id_seq", "registry_runs", ["project_id", "seq"])
    op.create_index("ix_registry_runs_job", "registry_runs", ["job"])
    op.create_index("ix_registry_runs_job_version", "registry_runs", ["job_version"])
    op.create_index("ix_registry_runs_queue_item", "registry_runs", ["queue_item"])
    for chunks in ("registry_metric_chunks", "registry_log_chunks"):
        op.create_table(
            chunks,
            sa.Column(
                "run_seq",
                sa.Integer,
                sa.ForeignKey("registry_runs.seq", ondelete="CASCADE"),
                primary_key=True,
            ),
            sa.Column("first_index", sa.BigInteger, primary_key=True),
            sa.Column("count", sa.Integer, nullable=False),
            sa.Column("payload", sa.LargeBinary, nullable=False),
            sa.Column("store_time", UtcDateTime, nullable=False),
        )
    op.create_table(
        "registry_request_ids",
        sa.Column("scope", sa.String(256), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "registry_request_ids",
        "registry_log_chunks",
        "registry_metric_chunks",
        "registry_runs",
        "registry_artifacts",
        "registry_job_aliases",
        "registry_job_versions",
        "registry_jobs",
        "registry_projects",
    ):
        op.drop_table(table)
