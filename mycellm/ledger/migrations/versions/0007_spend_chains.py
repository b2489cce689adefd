"""spend chains and served records: holds, releases and receipt terms by number, the frauds proven,
and what a seeder served a peer until its receipt settles

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "spend_statements",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("held_before", sa.BigInteger, nullable=False),
        sa.Column("max_price", sa.BigInteger, nullable=False),
        sa.Column("evidence", sa.LargeBinary, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "spend_frauds",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("first_kind", sa.String(8), nullable=False),
        sa.Column("first", sa.LargeBinary, nullable=False),
        sa.Column("second_kind", sa.String(8), nullable=False),
        sa.Column("second", sa.LargeBinary, nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "served_for_peers",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("peer_id", sa.String(64), nullable=False),
        sa.Column("consumer", sa.LargeBinary, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("tier", sa.String(32), nullable=True),
        sa.Column("max_tokens", sa.BigInteger, nullable=True),
        sa.Column("hold_seq", sa.BigInteger, nullable=True),
        sa.Column("held_before", sa.BigInteger, nullable=True),
        sa.Column("hold_price", sa.BigInteger, nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=True),
        sa.Column("completion_tokens", sa.BigInteger, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("served_for_peers")
    op.drop_table("spend_frauds")
    op.drop_table("spend_statements")
