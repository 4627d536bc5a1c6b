"""limits, cache policy, price history

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "limit_policy",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("key_id", sqltypes.AutoString(), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.Integer(), nullable=True),
        sa.Column("tokens_per_month", sa.Integer(), nullable=True),
        sa.Column("usd_per_day", sa.Float(), nullable=True),
        sa.Column("usd_per_month", sa.Float(), nullable=True),
        sa.Column("updated_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["org.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("org_id", "key_id"),
    )
    with op.batch_alter_table("limit_policy", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_limit_policy_org_id"), ["org_id"], unique=False)

    op.create_table(
        "price_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("provider", sqltypes.AutoString(), nullable=False),
        sa.Column("model", sqltypes.AutoString(), nullable=False),
        sa.Column("price_in", sa.Float(), nullable=True),
        sa.Column("price_out", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("price_change", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_price_change_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_price_change_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cache_mode", sqltypes.AutoString(), nullable=False, server_default="deterministic")
        )
        batch_op.add_column(sa.Column("cache_ttl_s", sa.Integer(), nullable=False, server_default="300"))

    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache", sqltypes.AutoString(), nullable=False, server_default="bypass"))
        batch_op.add_column(sa.Column("price_in", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("price_out", sa.Float(), nullable=True))

    # Prices set before this migration become the first entry of each model's history.
    op.execute(
        "INSERT INTO price_change (created_at, org_id, provider, model, price_in, price_out) "
        "SELECT provider.created_at, provider.org_id, provider.name, provider_model.alias, "
        "provider_model.price_in, provider_model.price_out "
        "FROM provider_model JOIN provider ON provider.id = provider_model.provider_id"
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.drop_column("price_out")
        batch_op.drop_column("price_in")
        batch_op.drop_column("cache")

    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.drop_column("cache_ttl_s")
        batch_op.drop_column("cache_mode")

    with op.batch_alter_table("price_change", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_price_change_org_id"))
        batch_op.drop_index(batch_op.f("ix_price_change_created_at"))
    op.drop_table("price_change")

    with op.batch_alter_table("limit_policy", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_limit_policy_org_id"))
    op.drop_table("limit_policy")
