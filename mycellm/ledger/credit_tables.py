"""Tables of the credit ledger: balances, the journal of every change, and the receipts behind them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from mycellm.ledger.tables import Base


class CreditAccountRow(Base):
    __tablename__ = "credit_accounts"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CreditEntryRow(Base):
    """One balance change: a grant (no receipt) or one party's share of a receipt."""

    __tablename__ = "credit_entries"
    __table_args__ = (Index("ix_credit_entries_account", "network_id", "account_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    network_id: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[str] = mapped_column(String(64))
    delta: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # grant | spend | earn | relay
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReceiptRow(Base):
    __tablename__ = "receipts"
    __table_args__ = (
        Index("ix_receipts_consumer", "network_id", "consumer_account"),
        Index("ix_receipts_seeder", "network_id", "seeder_account"),
    )

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    encoded: Mapped[bytes] = mapped_column(LargeBinary)
    consumer_account: Mapped[str] = mapped_column(String(64))
    seeder_account: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    price: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PendingReceiptRow(Base):
    """Terms this node signed as consumer whose receipt it does not hold yet (retried after restarts)."""

    __tablename__ = "pending_receipts"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(64), index=True)
    terms: Mapped[bytes] = mapped_column(LargeBinary)
    consumer_signature: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CreditGrantRow(Base):
    """The one initial grant of a member: at most one per account and network (its primary key)."""

    __tablename__ = "credit_grants"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ParkedReceiptRow(Base):
    """A heard receipt that would overdraw its consumer here: kept, not applied, until funded."""

    __tablename__ = "parked_receipts"
    __table_args__ = (Index("ix_parked_receipts_consumer", "network_id", "consumer_account"),)

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    consumer_account: Mapped[str] = mapped_column(String(64))
    encoded: Mapped[bytes] = mapped_column(LargeBinary)
    price: Mapped[int] = mapped_column(BigInteger)
    parked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SpendRow(Base):
    """One statement of an account's spend chain: a hold, a release, or a receipt's terms."""

    __tablename__ = "spend_statements"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    held_before: Mapped[int] = mapped_column(BigInteger)
    max_price: Mapped[int] = mapped_column(BigInteger)
    evidence: Mapped[bytes] = mapped_column(LargeBinary)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SpendFraudRow(Base):
    """A proof that an account's spend chain lies: two of its signed statements that contradict."""

    __tablename__ = "spend_frauds"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(200))
    first_kind: Mapped[str] = mapped_column(String(8))
    first: Mapped[bytes] = mapped_column(LargeBinary)
    second_kind: Mapped[str] = mapped_column(String(8))
    second: Mapped[bytes] = mapped_column(LargeBinary)
    detected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PeerServedRow(Base):
    """A request this node serves or served a peer, kept until its receipt settles: the seeder's
    side of the terms, which a restart must not forget (``usage`` is empty until it finished)."""

    __tablename__ = "served_for_peers"

    network_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(64))
    consumer: Mapped[bytes] = mapped_column(LargeBinary)
    model: Mapped[str] = mapped_column(String(256))
    tier: Mapped[str | None] = mapped_column(String(32), nullable=True)
    max_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    hold_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    held_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    hold_price: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
