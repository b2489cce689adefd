"""served requests

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "served_requests",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("route_kind", sa.String(16), nullable=False),
        sa.Column("route_target", sa.String(256), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("time_to_first_token_ms", sa.Float, nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_served_requests_model", "served_requests", ["model"])
    op.create_index("ix_served_requests_created_at", "served_requests", ["created_at"])


def downgrade() -> None:
    op.drop_table("served_requests")
