"""federation: an authority's invites, redemptions, memberships and public-network joins

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "federation_networks",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "invites",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("nonce", sa.LargeBinary(16), primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("max_uses", sa.Integer, nullable=False),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("bind_key", sa.LargeBinary(64), nullable=True),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_invites_uses"),
    )
    op.create_table(
        "invite_redemptions",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("nonce", sa.LargeBinary(16), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("redeemed_at", sa.Double, nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("network_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("issued_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("revoked_at", sa.Double, nullable=True),
        sa.Column("source", sa.String(128), nullable=True),
    )
    op.create_table(
        "join_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("network_id", sa.String(128), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("ix_join_attempts_source", "join_attempts", ["network_id", "source", "at"])
    op.create_index("ix_join_attempts_at", "join_attempts", ["network_id", "at"])


def downgrade() -> None:
    op.drop_table("join_attempts")
    op.drop_table("memberships")
    op.drop_table("invite_redemptions")
    op.drop_table("invites")
    op.drop_table("federation_networks")
