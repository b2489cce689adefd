"""pending receipts: signed terms waiting for the seeder's countersignature

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "pending_receipts",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("peer_id", sa.String(64), nullable=False),
        sa.Column("terms", sa.LargeBinary, nullable=False),
        sa.Column("consumer_signature", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pending_receipts_peer_id", "pending_receipts", ["peer_id"])


def downgrade() -> None:
    op.drop_table("pending_receipts")
