"""Signed run tokens (docs/design.md §13): the queues' signing keys, and the runs whose tokens are revoked.

Revision ID: 0007
Revises: 0006

A signed token is stored nowhere, so a revocation is kept per run: attempts never share a run.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_run_token_signers",
        sa.Column("signer_id", sa.String(63), primary_key=True),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("creator_key_id", sa.String(63), nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_table(
        "registry_revoked_runs",
        sa.Column("run", sa.String(200), primary_key=True),
        sa.Column("revoke_time", UtcDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_revoked_runs")
    op.drop_table("registry_run_token_signers")
