"""The outbox of run closes: the runs of attempts the queue ended without their agent, to be closed in the
registry (docs/design.md §16).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "queue_run_closes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run", sa.String(), nullable=False),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("next_try_time", UtcDateTime(), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_queue_run_closes_next_try_time"), "queue_run_closes", ["next_try_time"], unique=False
    )


def downgrade() -> None:
    op.drop_table("queue_run_closes")
