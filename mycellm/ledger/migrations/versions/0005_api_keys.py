"""api keys: callers of the HTTP API, their digests, scopes, limits, daily budgets and reservations

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("network", sa.String(128), nullable=True),
        sa.Column("budget_micro", sa.BigInteger, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=True),
        sa.Column("revoked_at", sa.Double, nullable=True),
        sa.Column("last_used_at", sa.Double, nullable=True),
        sa.Column("day", sa.Integer, nullable=False),
        sa.Column("spent_micro", sa.BigInteger, nullable=False),
        sa.Column("reserved_micro", sa.BigInteger, nullable=False),
        sa.CheckConstraint("spent_micro >= 0 AND reserved_micro >= 0", name="ck_api_keys_amounts"),
    )
    op.create_table(
        "api_key_reservations",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("ix_api_key_reservations_key_id", "api_key_reservations", ["key_id"])


def downgrade() -> None:
    op.drop_table("api_key_reservations")
    op.drop_table("api_keys")
