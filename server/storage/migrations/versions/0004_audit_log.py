"""audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("actor", sqltypes.AutoString(), nullable=False),
        sa.Column("action", sqltypes.AutoString(), nullable=False),
        sa.Column("target", sqltypes.AutoString(), nullable=False),
        sa.Column("before", sqltypes.AutoString(), nullable=False),
        sa.Column("after", sqltypes.AutoString(), nullable=False),
        sa.Column("request_id", sqltypes.AutoString(), nullable=False),
        sa.Column("prev_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("hash", sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_entry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_entry_created_at"), ["created_at"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("audit_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_entry_created_at"))

    op.drop_table("audit_entry")
