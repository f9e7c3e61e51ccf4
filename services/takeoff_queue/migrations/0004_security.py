"""Security (docs/design.md §13): who enqueued, cancelled or relaunched an item; secure queues, host paths
and secret mounts; and the outbox of run-token revocations (§16).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("queue_queues") as queues:
        queues.add_column(sa.Column("secure", sa.Boolean(), nullable=False, server_default=sa.false()))
        queues.add_column(
            sa.Column("allow_host_paths", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        queues.add_column(sa.Column("secrets", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("queue_items") as items:
        items.add_column(sa.Column("secrets", sa.JSON(), nullable=False, server_default="[]"))
        items.add_column(sa.Column("creator", sa.String(), nullable=False, server_default=""))
        items.add_column(sa.Column("cancelled_by", sa.String(), nullable=False, server_default=""))
    with op.batch_alter_table("queue_transitions") as transitions:
        transitions.add_column(sa.Column("actor", sa.String(), nullable=False, server_default=""))
    op.create_table(
        "queue_token_revocations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run", sa.String(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("next_try_time", UtcDateTime(), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_queue_token_revocations_next_try_time"),
        "queue_token_revocations",
        ["next_try_time"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_table("queue_token_revocations")
    with op.batch_alter_table("queue_transitions") as transitions:
        transitions.drop_column("actor")
    with op.batch_alter_table("queue_items") as items:
        items.drop_column("cancelled_by")
        items.drop_column("creator")
        items.drop_column("secrets")
    with op.batch_alter_table("queue_queues") as queues:
        queues.drop_column("secrets")
        queues.drop_column("allow_host_paths")
        queues.drop_column("secure")
