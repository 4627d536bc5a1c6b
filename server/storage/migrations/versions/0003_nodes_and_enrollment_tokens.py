"""nodes and enrollment tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "enrollment_token",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("token_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("labels", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["org.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_token_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_enrollment_token_token_hash"), ["token_hash"], unique=True)

    op.create_table(
        "node",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("machine_id", sqltypes.AutoString(), nullable=False),
        sa.Column("credential_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("labels", sqltypes.AutoString(), nullable=False),
        sa.Column("drained", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("enrolled_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["org.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("org_id", "machine_id"),
    )
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_credential_hash"), ["credential_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_node_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node_id", sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f("ix_usage_record_node_id"), ["node_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_record_node_id"))
        batch_op.drop_column("node_id")

    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_org_id"))
        batch_op.drop_index(batch_op.f("ix_node_credential_hash"))

    op.drop_table("node")
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_token_token_hash"))
        batch_op.drop_index(batch_op.f("ix_enrollment_token_org_id"))

    op.drop_table("enrollment_token")
