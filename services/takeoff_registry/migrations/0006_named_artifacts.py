"""Named artifacts (ArtifactService): collections, versions, aliases, blobs and uses; Run.resumed_from.

Revision ID: 0006
Revises: 0005

Runs from before read as resuming nothing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import JsonText, UtcDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "registry_runs", sa.Column("resumed_from", sa.String(200), nullable=False, server_default="")
    )
    op.create_table(
        "registry_artifact_collections",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), nullable=False),
        sa.Column("artifact_id", sa.String(128), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("version_count", sa.Integer, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("update_time", UtcDateTime, nullable=False),
        sa.UniqueConstraint("project_id", "artifact_id"),
    )
    op.create_table(
        "registry_artifact_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "collection_pk",
            sa.Integer,
            sa.ForeignKey("registry_artifact_collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("files", JsonText, nullable=False),
        sa.Column("user_metadata", JsonText, nullable=False),
        sa.Column("run", sa.String(200), nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.UniqueConstraint("collection_pk", "version"),
    )
    op.create_index(
        "ix_registry_artifact_versions_collection_pk_digest",
        "registry_artifact_versions",
        ["collection_pk", "digest"],
    )
    op.create_index(
        "ix_registry_artifact_versions_project_id_id", "registry_artifact_versions", ["project_id", "id"]
    )
    op.create_index("ix_registry_artifact_versions_run", "registry_artifact_versions", ["run"])
    op.create_table(
        "registry_artifact_aliases",
        sa.Column(
            "collection_pk",
            sa.Integer,
            sa.ForeignKey("registry_artifact_collections.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("alias", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "registry_artifact_blobs",
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), primary_key=True
        ),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_table(
        "registry_artifact_uses",
        sa.Column(
            "version_pk",
            sa.Integer,
            sa.ForeignKey("registry_artifact_versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("run", sa.String(200), primary_key=True),
        sa.Column("use_time", UtcDateTime, nullable=False),
    )
    op.create_index("ix_registry_artifact_uses_run", "registry_artifact_uses", ["run"])
    op.create_index(
        "ix_registry_artifact_uses_version_pk_use_time", "registry_artifact_uses", ["version_pk", "use_time"]
    )


def downgrade() -> None:
    for table in (
        "registry_artifact_uses",
        "registry_artifact_blobs",
        "registry_artifact_aliases",
        "registry_artifact_versions",
        "registry_artifact_collections",
    ):
        op.drop_table(table)
    op.drop_column("registry_runs", "resumed_from")
