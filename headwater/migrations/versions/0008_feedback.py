"""Answer feedback from users and stored retrieval evaluations, so quality is watched over time."""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False, index=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
    )
    op.create_table(
        "evaluation_runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("variant", sa.String(200), primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False, index=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("dataset_fingerprint", sa.String(64), nullable=False, index=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("per_query", sa.JSON, nullable=False),
    )
    # Feedback names the question it rates by request id: finding that question must not scan
    # the whole audit trail.
    op.create_index("ix_audit_log_request_id", "audit_log", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_request_id", "audit_log")
    op.drop_table("evaluation_runs")
    op.drop_table("feedback")
