"""Documents carry a status: indexed, or stale when a newer version was quarantined."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("documents") as table:
        table.add_column(
            sa.Column("status", sa.String(20), nullable=False, server_default="indexed")
        )


def downgrade() -> None:
    with op.batch_alter_table("documents") as table:
        table.drop_column("status")
