"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "admin_key",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("key_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("admin_key", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_key_key_hash"), ["key_hash"], unique=True)

    op.create_table(
        "org",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_org_name"), ["name"], unique=True)

    op.create_table(
        "usage_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("key_id", sqltypes.AutoString(), nullable=False),
        sa.Column("endpoint", sqltypes.AutoString(), nullable=False),
        sa.Column("model", sqltypes.AutoString(), nullable=False),
        sa.Column("target", sqltypes.AutoString(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("error_code", sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_record_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_usage_record_key_id"), ["key_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_usage_record_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_usage_record_request_id"), ["request_id"], unique=False)

    op.create_table(
        "api_key",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("prefix", sqltypes.AutoString(), nullable=False),
        sa.Column("key_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("models", sqltypes.AutoString(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["org.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_key_key_hash"), ["key_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_api_key_org_id"), ["org_id"], unique=False)

    op.create_table(
        "provider",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("base_url", sqltypes.AutoString(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["org.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_provider_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_provider_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_provider_position"), ["position"], unique=False)

    op.create_table(
        "provider_key",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("provider_id", sqltypes.AutoString(), nullable=False),
        sa.Column("ciphertext", sqltypes.AutoString(), nullable=False),
        sa.Column("hint", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["provider_id"], ["provider.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("provider_key", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_provider_key_provider_id"), ["provider_id"], unique=False)

    op.create_table(
        "provider_model",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("provider_id", sqltypes.AutoString(), nullable=False),
        sa.Column("alias", sqltypes.AutoString(), nullable=False),
        sa.Column("upstream_model", sqltypes.AutoString(), nullable=False),
        sa.Column("price_in", sa.Float(), nullable=True),
        sa.Column("price_out", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["provider_id"], ["provider.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("provider_model", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_provider_model_alias"), ["alias"], unique=False)
        batch_op.create_index(batch_op.f("ix_provider_model_provider_id"), ["provider_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("provider_model", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_model_provider_id"))
        batch_op.drop_index(batch_op.f("ix_provider_model_alias"))

    op.drop_table("provider_model")
    with op.batch_alter_table("provider_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_key_provider_id"))

    op.drop_table("provider_key")
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_position"))
        batch_op.drop_index(batch_op.f("ix_provider_org_id"))
        batch_op.drop_index(batch_op.f("ix_provider_name"))

    op.drop_table("provider")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_key_org_id"))
        batch_op.drop_index(batch_op.f("ix_api_key_key_hash"))

    op.drop_table("api_key")
    with op.batch_alter_table("usage_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_record_request_id"))
        batch_op.drop_index(batch_op.f("ix_usage_record_org_id"))
        batch_op.drop_index(batch_op.f("ix_usage_record_key_id"))
        batch_op.drop_index(batch_op.f("ix_usage_record_created_at"))

    op.drop_table("usage_record")
    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_org_name"))

    op.drop_table("org")
    with op.batch_alter_table("admin_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_key_key_hash"))

    op.drop_table("admin_key")
