"""The state store's first schema: sources, runs, documents, quarantine, embedding cache."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("type", sa.String(50), nullable=False),
        sa.Column("cursor", sa.JSON, nullable=True),
        sa.Column("last_success_at", sa.DateTime, nullable=True),
        sa.Column("lock_owner", sa.String(200), nullable=True),
        sa.Column("lock_expires", sa.DateTime, nullable=True),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("source", sa.String(200), nullable=False, index=True),
        sa.Column("flow_run_id", sa.String(36), nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("summary", sa.JSON, nullable=True),
    )
    op.create_table(
        "documents",
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("doc_id", sa.String(1000), primary_key=True),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("fingerprint", sa.String(200), nullable=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("chunk_count", sa.Integer, nullable=False),
        sa.Column("principals", sa.JSON, nullable=True),
        sa.Column("indexed_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "quarantine",
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("doc_id", sa.String(1000), primary_key=True),
        sa.Column("stage", sa.String(50), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("version", sa.String(200), nullable=True),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
    )
    op.create_table(
        "embedding_cache",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("text_hash", sa.String(64), primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("embedding_cache", "quarantine", "documents", "sync_runs", "sources"):
        op.drop_table(table)
