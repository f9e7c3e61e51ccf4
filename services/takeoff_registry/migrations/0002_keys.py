"""API keys and run tokens: what each was made for and the SHA-256 digest of its secret.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import JsonText, UtcDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_keys",
        sa.Column("key_id", sa.String(63), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("projects", JsonText, nullable=False),
        sa.Column("queues", JsonText, nullable=False),
        sa.Column("secrets", JsonText, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("service", sa.String(16), nullable=False),
        sa.Column("run", sa.String(200), nullable=False),
        sa.Column("item", sa.String(300), nullable=False),
        sa.Column("job_version", sa.String(300), nullable=False),
        sa.Column("secret_digest", sa.String(64), nullable=False),
        sa.Column("secret_hint", sa.String(80), nullable=False),
        sa.Column("creator", sa.String(200), nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("revoke_time", UtcDateTime, nullable=True),
    )
    op.create_index("ix_registry_keys_secret_digest", "registry_keys", ["secret_digest"], unique=True)
    op.create_index("ix_registry_keys_run", "registry_keys", ["run"])


def downgrade() -> None:
    op.drop_table("registry_keys")
