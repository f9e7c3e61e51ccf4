"""Metric chunks carry their rows' values by key, for ReadMetrics ``max_points`` (takeoff_registry.sampling).

Revision ID: 0005
Revises: 0004

Chunks stored before have none (NULL): sampling makes their columns from the rows when it reads them, so
nothing is rewritten here.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("registry_metric_chunks", sa.Column("value_columns", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    op.drop_column("registry_metric_chunks", "value_columns")
