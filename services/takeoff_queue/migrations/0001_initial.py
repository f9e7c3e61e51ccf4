"""The queue service's first schema: queues, items, their transitions, request ids.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from takeoff_server.sqltypes import UtcDateTime

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "queue_items",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("queue", sa.String(), nullable=False),
        sa.Column("job", sa.String(), nullable=False),
        sa.Column("job_version", sa.String(), nullable=False),
        sa.Column("job_version_proto", sa.LargeBinary(), nullable=False),
        sa.Column("source_kind", sa.String(), nullable=False),
        sa.Column("run_config", sa.JSON(), nullable=False),
        sa.Column("entrypoint", sa.JSON(), nullable=False),
        sa.Column("resource_config_override", sa.JSON(), nullable=False),
        sa.Column("template_variables", sa.JSON(), nullable=False),
        sa.Column("resource_config", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("max_run_seconds", sa.Float(), nullable=True),
        sa.Column("run_display_name", sa.String(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("completed_epoch", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("enqueue_time", UtcDateTime(), nullable=False),
        sa.Column("eligible_time", UtcDateTime(), nullable=False),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.Column("end_time", UtcDateTime(), nullable=True),
        sa.Column("lease_id", sa.String(), nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("assign_time", UtcDateTime(), nullable=True),
        sa.Column("start_deadline", UtcDateTime(), nullable=True),
        sa.Column("running_since", UtcDateTime(), nullable=True),
        sa.Column("run", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("traceparent", sa.String(), nullable=False),
        sa.Column("relaunched_from", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index(op.f("ix_queue_items_id"), "queue_items", ["id"], unique=True)
    op.create_index(op.f("ix_queue_items_queue"), "queue_items", ["queue"], unique=False)
    op.create_index(op.f("ix_queue_items_state"), "queue_items", ["state"], unique=False)
    op.create_table(
        "queue_queues",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("resource", sa.String(), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("resource_config", sa.JSON(), nullable=False),
        sa.Column("template_variables", sa.JSON(), nullable=False),
        sa.Column("prioritization", sa.Boolean(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_job_failures", sa.Boolean(), nullable=False),
        sa.Column("retry_delay_seconds", sa.Float(), nullable=False),
        sa.Column("start_timeout_seconds", sa.Float(), nullable=False),
        sa.Column("max_run_seconds", sa.Float(), nullable=True),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("container_name", sa.String(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index(op.f("ix_queue_queues_project"), "queue_queues", ["project"], unique=False)
    op.create_table(
        "queue_request_ids",
        sa.Column("scope", sa.String(length=256), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "request_id"),
    )
    op.create_table(
        "queue_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("time", UtcDateTime(), nullable=False),
        sa.Column("from_state", sa.String(), nullable=True),
        sa.Column("to_state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("agent", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("run", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_queue_transitions_item_id"), "queue_transitions", ["item_id"], unique=False)


def downgrade() -> None:
    for table in ("queue_transitions", "queue_request_ids", "queue_queues", "queue_items"):
        op.drop_table(table)
