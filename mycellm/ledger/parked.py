"""Parked receipts: heard receipts that would overdraw their consumer, kept until receipts fund it.

A receipt between two other parties is a fact both signed, but this node's books may not show the
consumer able to pay it (a funding receipt still on its way, or two accounts colluding to create
credits). Applying it would drive the consumer negative and make the seeder's credits spendable
out of nothing; refusing it would lose a receipt that is merely early. So it is parked: kept, not
applied, and tried again whenever the consumer is credited. Parked receipts are bounded per
consumer and per network; beyond that a heard receipt that cannot be paid is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mycellm.errors import ReceiptError
from mycellm.ledger.credit_tables import ParkedReceiptRow
from mycellm.ledger.receipts import CheckedReceipt

MAX_PARKED_PER_CONSUMER = 256
MAX_PARKED = 10_000


async def parked_encodings(
    session: AsyncSession, network_id: str, request_ids: Iterable[str]
) -> dict[str, bytes]:
    """The parked receipts among ``request_ids``: request id -> encoding."""
    rows = await session.execute(
        select(ParkedReceiptRow.request_id, ParkedReceiptRow.encoded).where(
            ParkedReceiptRow.network_id == network_id, ParkedReceiptRow.request_id.in_(list(request_ids))
        )
    )
    return dict(rows.all())


async def park(
    session: AsyncSession, network_id: str, checked: CheckedReceipt, encoded: bytes, now: datetime
) -> None:
    """Keep ``checked`` unapplied (inside the caller's transaction); ReceiptError if the bounds are reached."""
    consumer = checked.consumer.account_id
    held = await session.scalar(
        select(func.count()).where(
            ParkedReceiptRow.network_id == network_id, ParkedReceiptRow.consumer_account == consumer
        )
    )
    total = await session.scalar(select(func.count()).where(ParkedReceiptRow.network_id == network_id))
    if (held or 0) >= MAX_PARKED_PER_CONSUMER or (total or 0) >= MAX_PARKED:
        raise ReceiptError(
            f"receipt {checked.request_id} overdraws its consumer {consumer[:12]} and no more unfunded "
            "receipts are kept",
            code="receipt_unfunded",
        )
    session.add(
        ParkedReceiptRow(
            network_id=network_id,
            request_id=checked.request_id,
            consumer_account=consumer,
            encoded=encoded,
            price=checked.terms.price,
            parked_at=now,
        )
    )


async def parked_of(session: AsyncSession, network_id: str, consumers: Iterable[str]) -> list[bytes]:
    """The parked receipts of ``consumers``, oldest first."""
    rows = await session.scalars(
        select(ParkedReceiptRow.encoded)
        .where(
            ParkedReceiptRow.network_id == network_id, ParkedReceiptRow.consumer_account.in_(list(consumers))
        )
        .order_by(ParkedReceiptRow.parked_at, ParkedReceiptRow.request_id)
        .limit(MAX_PARKED_PER_CONSUMER)
    )
    return list(rows)


async def unpark(session: AsyncSession, network_id: str, request_ids: list[str]) -> None:
    """Forget the parked copies of receipts applied now (inside the caller's transaction)."""
    await session.execute(
        delete(ParkedReceiptRow).where(
            ParkedReceiptRow.network_id == network_id, ParkedReceiptRow.request_id.in_(request_ids)
        )
    )


async def parked_ids(session: AsyncSession, network_id: str) -> list[str]:
    """The request ids of ``network_id``'s parked receipts."""
    rows = await session.scalars(
        select(ParkedReceiptRow.request_id)
        .where(ParkedReceiptRow.network_id == network_id)
        .order_by(ParkedReceiptRow.request_id)
    )
    return list(rows)
