"""provider continuation: how a provider continues a broken stream is declared, never learnt

The `prefill` column (auto, yes, no) becomes `continuation` (regenerate, prefill, vllm, none). "auto" learnt that
a provider continues a final assistant message from a 200 answer, which proves nothing (OpenAI's own API answers
it with a new message), and stitched two answers together: it becomes "regenerate", the checked default, as does
"no"; "yes" becomes "prefill". Downgrading maps back without ever turning a provider into "auto": only
"prefill" becomes "yes", everything else "no".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("continuation", sqltypes.AutoString(), nullable=False, server_default="regenerate")
        )
    op.execute("UPDATE provider SET continuation = CASE WHEN prefill = 'yes' THEN 'prefill' ELSE 'regenerate' END")
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_column("prefill")


def downgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prefill", sqltypes.AutoString(), nullable=False, server_default="auto"))
    op.execute("UPDATE provider SET prefill = CASE WHEN continuation = 'prefill' THEN 'yes' ELSE 'no' END")
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_column("continuation")
