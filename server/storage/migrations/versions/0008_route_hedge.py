"""route hedge: how a route hedges a slow first token

Each routing rule may say how a stream whose first content token is late is hedged (server.routing.hedge): off, auto or
a number of seconds. Existing rules get NULL, which takes the plane's `hedge` setting (auto by default).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("route_rule", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hedge", sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("route_rule", schema=None) as batch_op:
        batch_op.drop_column("hedge")
