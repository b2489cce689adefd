"""credit ledger: accounts, journal entries, receipts

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "credit_accounts",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "credit_entries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("network_id", sa.String(128), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_credit_entries_account", "credit_entries", ["network_id", "account_id"])
    op.create_index("ix_credit_entries_request_id", "credit_entries", ["request_id"])
    op.create_table(
        "receipts",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("encoded", sa.LargeBinary, nullable=False),
        sa.Column("consumer_account", sa.String(64), nullable=False),
        sa.Column("seeder_account", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receipts_consumer", "receipts", ["network_id", "consumer_account"])
    op.create_index("ix_receipts_seeder", "receipts", ["network_id", "seeder_account"])
    op.create_index("ix_receipts_recorded_at", "receipts", ["recorded_at"])


def downgrade() -> None:
    op.drop_table("receipts")
    op.drop_table("credit_entries")
    op.drop_table("credit_accounts")
