"""Initial schema: usage intervals, checkpoints, budgets, quota caps, audit log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_interval",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("uid", sa.String(255), nullable=False),
        sa.Column("start_s", sa.BigInteger(), nullable=False),
        sa.Column("end_s", sa.BigInteger(), nullable=True),
        sa.Column("last_seen_s", sa.BigInteger(), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("profile", sa.String(255), nullable=False),
        sa.Column("accelerator", sa.String(255), nullable=False),
        sa.Column("accelerator_kind", sa.String(8), nullable=False),
        sa.Column("accelerator_count", sa.Integer(), nullable=False),
        sa.Column("gpu_fraction", sa.Float(), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory", sa.BigInteger(), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_interval"),
        sa.UniqueConstraint(
            "source", "uid", "start_s", name="uq_usage_interval_source_uid_start_s"
        ),
    )
    op.create_index("ix_usage_interval_start_s", "usage_interval", ["start_s"])
    op.create_index("ix_usage_interval_end_s", "usage_interval", ["end_s"])
    op.create_index(
        "ix_usage_interval_group_name_start_s", "usage_interval", ["group_name", "start_s"]
    )
    op.create_index(
        "ix_usage_interval_user_name_start_s", "usage_interval", ["user_name", "start_s"]
    )
    op.create_table(
        "collector_checkpoint",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("position", sa.Text(), nullable=False),
        sa.Column("updated_s", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("source", name="pk_collector_checkpoint"),
    )
    op.create_table(
        "budget",
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("gpu_hours", sa.Float(), nullable=False),
        sa.Column("warn_fraction", sa.Float(), nullable=False),
        sa.Column("enforce", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("group_name", name="pk_budget"),
    )
    op.create_table(
        "quota_cap",
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("flavor", sa.String(255), nullable=False),
        sa.Column("resource", sa.String(255), nullable=False),
        sa.Column("max_nominal", sa.String(64), nullable=False),
        sa.Column("max_borrowing", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("group_name", "flavor", "resource", name="pk_quota_cap"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at_s", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_target_at_s", "audit_log", ["target", "at_s"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_target_at_s", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("quota_cap")
    op.drop_table("budget")
    op.drop_table("collector_checkpoint")
    for index in ("user_name_start_s", "group_name_start_s", "end_s", "start_s"):
        op.drop_index(f"ix_usage_interval_{index}", table_name="usage_interval")
    op.drop_table("usage_interval")
