"""provider egress: a provider's own proxy, CA file and client certificate

Each provider may carry its own egress settings (server.targets.egress) as a JSON object: `proxy` (a URL shown
with its credentials redacted, `none`), `proxy_ciphertext` (the URL with its credentials, Fernet-encrypted as
provider keys are), `ca_file`, `client_cert`, `client_key` (paths on the plane's machine). Existing providers get
an empty text: the plane's settings (the environment's proxies, the system's CAs), as before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.add_column(sa.Column("egress", sqltypes.AutoString(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("provider", schema=None) as batch_op:
        batch_op.drop_column("egress")
