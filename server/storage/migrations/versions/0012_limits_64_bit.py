"""limits 64-bit: rate limits and token quotas as BIGINT

On PostgreSQL the integer limits were INTEGER columns, so a limit of 2^31 or more (a month's quota of 3 billion
tokens) was refused by the database with a 500. SQLite's integers were 64-bit already; its schema is unchanged
in effect.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COLUMNS = ("rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month")


def upgrade() -> None:
    with op.batch_alter_table("limit_policy", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("limit_policy", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
