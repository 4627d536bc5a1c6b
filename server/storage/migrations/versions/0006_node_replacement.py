"""node replacement: a machine id is no proof of identity

Re-enrolling keeps a node's id only with its current credential or a token that replaces it, so two nodes of one
org may now report the same machine id (a second token for a machine, or a copied config): the unique
(org_id, machine_id) constraint goes, and enrollment tokens record the node they replace.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# SQLite reflects the constraint 0003 created without a name; batch mode names it by this convention to drop it.
SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replace_node_id", sqltypes.AutoString(), nullable=True))

    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("node", schema=None, naming_convention=SQLITE_NAMES) as batch_op:
            batch_op.drop_constraint("uq_node_org_id", type_="unique")
        return
    for constraint in sa.inspect(bind).get_unique_constraints("node"):
        if sorted(constraint["column_names"]) == ["machine_id", "org_id"] and constraint["name"]:
            op.drop_constraint(constraint["name"], "node", type_="unique")


def downgrade() -> None:
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_node_org_id", ["org_id", "machine_id"])

    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_column("replace_node_id")
