"""accounts and roles: console accounts, their sessions, invitations, scoped admin tokens, and ownership

New tables `account`, `account_session`, `invitation`, `admin_token` (server.accounts). Ownership columns: an API
key's owning account (and whether it is an account's playground key), the account that created an enrollment
token and the account that owns the nodes enrolled with it. An org's `providers_may_enroll` lets its provider
accounts create enrollment tokens themselves. Existing rows get no owner: they stay the org's.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("email", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("role", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=True),
        sa.Column("password_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["org.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("account", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_account_email"), ["email"], unique=True)
        batch_op.create_index(batch_op.f("ix_account_org_id"), ["org_id"], unique=False)

    op.create_table(
        "account_session",
        sa.Column("id_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("account_id", sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    with op.batch_alter_table("account_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_account_session_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_account_session_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "invitation",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("token_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("email", sqltypes.AutoString(), nullable=False),
        sa.Column("role", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=True),
        sa.Column("created_by", sqltypes.AutoString(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=False),
        sa.Column("used_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["org.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("invitation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_invitation_token_hash"), ["token_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_invitation_org_id"), ["org_id"], unique=False)

    op.create_table(
        "admin_token",
        sa.Column("id", sqltypes.AutoString(), nullable=False),
        sa.Column("name", sqltypes.AutoString(), nullable=False),
        sa.Column("token_hash", sqltypes.AutoString(), nullable=False),
        sa.Column("role", sqltypes.AutoString(), nullable=False),
        sa.Column("org_id", sqltypes.AutoString(), nullable=True),
        sa.Column("account_id", sqltypes.AutoString(), nullable=True),
        sa.Column("created_by", sqltypes.AutoString(), nullable=False),
        sa.Column("expires_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["org.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("admin_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_token_token_hash"), ["token_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_admin_token_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_admin_token_account_id"), ["account_id"], unique=False)

    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.add_column(sa.Column("providers_may_enroll", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_account_id", sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("console", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_api_key_owner_account_id"), ["owner_account_id"], unique=False)
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_by", sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f("ix_enrollment_token_created_by"), ["created_by"], unique=False)
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_account_id", sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f("ix_node_owner_account_id"), ["owner_account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_owner_account_id"))
        batch_op.drop_column("owner_account_id")
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_token_created_by"))
        batch_op.drop_column("created_by")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_key_owner_account_id"))
        batch_op.drop_column("console")
        batch_op.drop_column("owner_account_id")
    with op.batch_alter_table("org", schema=None) as batch_op:
        batch_op.drop_column("providers_may_enroll")
    for table in ("admin_token", "invitation", "account_session", "account"):
        op.drop_table(table)
