"""The documents each persisted answer was built from, so an erasure can withdraw the answer."""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"


def upgrade() -> None:
    op.create_table(
        "persisted_answers",
        sa.Column("flow_run_id", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("doc_id", sa.String(1000), primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_persisted_answers_document", "persisted_answers", ["source", "doc_id"])


def downgrade() -> None:
    op.drop_index("ix_persisted_answers_document", "persisted_answers")
    op.drop_table("persisted_answers")
