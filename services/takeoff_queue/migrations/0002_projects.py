"""The projects written to through the queue service, kept when their last queue is deleted; filled from
the queues stored so far.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "queue_projects",
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project"),
    )
    op.execute(
        "INSERT INTO queue_projects (project, create_time) "
        "SELECT project, MIN(create_time) FROM queue_queues GROUP BY project"
    )


def downgrade() -> None:
    op.drop_table("queue_projects")
