"""Builder replicas sharing a PostgreSQL database: the advisory lock a build's flight is held by, so that
they can tell a build under way elsewhere from one whose holder died, and the cache entries a build uses
or makes, so that no replica's retention prunes what another's build under way holds.

Revision ID: 0002
Revises: 0001

Builds recorded before have 0, which no flight hashes to in practice, and hold nothing; they are all ended
or left by a stopped single builder, which recovery fails as before.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column(
        "builder_builds", sa.Column("flight_lock", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column("builder_builds", sa.Column("holds", sa.JSON(), nullable=False, server_default="[]"))
    op.create_index("ix_builder_builds_flight_lock_state", "builder_builds", ["flight_lock", "state"])


def downgrade() -> None:
    with op.batch_alter_table("builder_builds") as batch:
        batch.drop_index("ix_builder_builds_flight_lock_state")
        batch.drop_column("holds")
        batch.drop_column("flight_lock")
