"""Tables of an authority's books: invites, their redemptions, memberships and public-network joins.

Times are Unix seconds (double precision), as the signed invites and certificates carry them, so a
comparison with a token's expiry is exact on every backend and needs no time zone.
"""

from __future__ import annotations

from sqlalchemy import Boolean, CheckConstraint, Double, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from mycellm.ledger.tables import Base

NONCE_BYTES = 16


class FederationNetworkRow(Base):
    """One row per network the authority keeps books for: the row its public joins queue on."""

    __tablename__ = "federation_networks"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[float] = mapped_column(Double)


class InviteRow(Base):
    __tablename__ = "invites"
    __table_args__ = (
        # The conditional UPDATE of a redemption keeps this; the check is the database's own guard.
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_invites_uses"),
    )

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(NONCE_BYTES), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Double)
    bind_key: Mapped[bytes | None] = mapped_column(LargeBinary(64), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[float] = mapped_column(Double)


class InviteRedemptionRow(Base):
    """One redemption of an invite; the key makes a replay by the same account recognisable."""

    __tablename__ = "invite_redemptions"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(NONCE_BYTES), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    redeemed_at: Mapped[float] = mapped_column(Double)


class MembershipRow(Base):
    __tablename__ = "memberships"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    issued_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    revoked_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)


class JoinAttemptRow(Base):
    """One admitted join of a public network from a source address (refusals leave no row)."""

    __tablename__ = "join_attempts"
    __table_args__ = (
        Index("ix_join_attempts_source", "network_id", "source", "at"),
        Index("ix_join_attempts_at", "network_id", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    network_id: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(128))
    at: Mapped[float] = mapped_column(Double)
