"""Sources remember how their documents were processed, so a change re-reads them all."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("sources") as table:
        table.add_column(sa.Column("processing", sa.String(64), nullable=True))
    # Documents indexed before this revision went through unknown processing (no compliance
    # stage at all): their sources' next runs read everything again.
    op.execute("UPDATE sources SET processing = 'before-0005'")


def downgrade() -> None:
    with op.batch_alter_table("sources") as table:
        table.drop_column("processing")
