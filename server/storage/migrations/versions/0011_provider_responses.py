"""provider responses: whether a provider serves OpenAI's /v1/responses itself

A provider that does gets /v1/responses requests relayed as they are; every other provider (and every node) gets
them translated to chat completions (server.responses). Existing providers are chat-only until declared otherwise
(`hatchway admin provider set NAME --responses`): translation works on any OpenAI-compatible server.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.add_column(sa.Column("responses", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_column("responses")
