"""Each queue's line on an index, in both dispatch orders: the queue loads the first PENDING items of each
queue and pages in the rest as dispatch reaches them (docs/design.md §9 "The queue's in-memory index").

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_index("ix_queue_items_line", "queue_items", ["queue", "state", "seq"], unique=False)
    op.create_index(
        "ix_queue_items_priority_line", "queue_items", ["queue", "state", "priority", "seq"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_queue_items_priority_line", table_name="queue_items")
    op.drop_index("ix_queue_items_line", table_name="queue_items")
