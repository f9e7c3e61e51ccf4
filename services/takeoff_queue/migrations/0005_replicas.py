"""Queue replicas (docs/design.md §5 "Several queue replicas"): every item write is conditional on the
item's revision, and each agent's lease expiry is kept by the database's clock.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("queue_items") as items:
        items.add_column(sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "queue_agents",
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("lease_expiry", UtcDateTime(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("agent_id"),
    )
    op.create_index(op.f("ix_queue_agents_lease_expiry"), "queue_agents", ["lease_expiry"], unique=False)


def downgrade() -> None:
    op.drop_table("queue_agents")
    with op.batch_alter_table("queue_items") as items:
        items.drop_column("revision")
