"""The subject index (keyed hashes of identifiers -> documents), and document classifications."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "subjects",
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("doc_id", sa.String(1000), primary_key=True),
        # HMAC-SHA256 of the normalized identifier: the raw value is never stored.
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("entity_type", sa.String(50), primary_key=True),
        sa.Column("ordinals", sa.JSON, nullable=False),
    )
    op.create_index("ix_subjects_subject", "subjects", ["subject"])
    with op.batch_alter_table("documents") as table:
        table.add_column(sa.Column("classification", sa.String(20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("documents") as table:
        table.drop_column("classification")
    op.drop_index("ix_subjects_subject", table_name="subjects")
    op.drop_table("subjects")
