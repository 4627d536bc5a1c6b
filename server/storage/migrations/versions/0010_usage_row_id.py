"""usage row id: each usage row's own id, unique, so the usage spool's replay inserts a row at most once

Rows written from now on carry `row_id` (made by the plane when the row is made); rows from before are NULL, which
a unique index allows any number of.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.add_column(sa.Column("row_id", sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f("ix_usage_record_row_id"), ["row_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_record_row_id"))
        batch_op.drop_column("row_id")
