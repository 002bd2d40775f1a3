"""Change notifications waiting for `ingest_changes`, durable across restarts."""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "pending_changes",
        sa.Column("source", sa.String(200), primary_key=True),
        # "" stands for "the source's list changed" (a SharePoint webhook names no items).
        sa.Column("doc_id", sa.String(1000), primary_key=True),
        # Replaced by every notification of the same document, so a run clears only the
        # notifications it read, never one that arrived while it was indexing.
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("noted_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pending_changes")
