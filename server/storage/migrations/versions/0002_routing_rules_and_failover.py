"""routing rules and failover

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows get the defaults the models declare.
    op.create_table(
        "route_rule",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("pattern", sqltypes.AutoString(), nullable=False),
        sa.Column("strategy", sqltypes.AutoString(), nullable=False),
        sa.Column("targets", sqltypes.AutoString(), nullable=False),
        sa.Column("fallbacks", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["org.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("org_id", "pattern"),
    )
    with op.batch_alter_table("route_rule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_route_rule_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy", sqltypes.AutoString(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("prefill", sqltypes.AutoString(), nullable=False, server_default="auto"))

    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("provider_key_id", sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.drop_column("provider_key_id")
        batch_op.drop_column("final")

    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_column("prefill")
        batch_op.drop_column("policy")

    with op.batch_alter_table("route_rule", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_route_rule_org_id"))

    op.drop_table("route_rule")
