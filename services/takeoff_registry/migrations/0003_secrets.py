"""Users' secrets: one row per secret of a project, its value encrypted (takeoff_registry.secrets).

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_secrets",
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("registry_projects.project_id"), primary_key=True
        ),
        sa.Column("secret_id", sa.String(63), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("update_time", UtcDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_secrets")
