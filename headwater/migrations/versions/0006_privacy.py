"""Data-subject requests: the suppression list that keeps erased subjects erased."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "suppressed_subjects",
        # The subject index's keyed hash of an erased identifier: never the value itself.
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("entity_type", sa.String(50), nullable=False),
        # "chunks": chunks mentioning the subject are withheld; "document": whole documents.
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("suppressed_at", sa.DateTime, nullable=False),
    )
    # The source-side modification time retention is judged by; NULL for rows indexed before
    # this revision (kept until a full sync records it).
    with op.batch_alter_table("documents") as table:
        table.add_column(sa.Column("modified", sa.DateTime, nullable=True))
    op.create_index("ix_documents_source_modified", "documents", ["source", "modified"])


def downgrade() -> None:
    op.drop_index("ix_documents_source_modified", table_name="documents")
    with op.batch_alter_table("documents") as table:
        table.drop_column("modified")
    op.drop_table("suppressed_subjects")
