"""grants and parked receipts: one grant per member and network, heard receipts kept until funded

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "credit_grants",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # The grants already journalled: each account keeps its one grant (a second would be refused).
    op.execute(
        "INSERT INTO credit_grants (network_id, account_id, amount, created_at) "
        "SELECT network_id, account_id, MIN(delta), MIN(created_at) FROM credit_entries "
        "WHERE kind = 'grant' GROUP BY network_id, account_id"
    )
    op.create_table(
        "parked_receipts",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("consumer_account", sa.String(64), nullable=False),
        sa.Column("encoded", sa.LargeBinary, nullable=False),
        sa.Column("price", sa.BigInteger, nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_parked_receipts_consumer", "parked_receipts", ["network_id", "consumer_account"])


def downgrade() -> None:
    op.drop_table("parked_receipts")
    op.drop_table("credit_grants")
