"""Read-only views of the credit ledger for the node API and the CLI: transfers and receipt pages."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from mycellm.ledger.credit_tables import CreditEntryRow, ReceiptRow
from mycellm.ledger.pricing import credits

Role = Literal["consumer", "seeder", "any"]


async def recent_transfers(
    engine: AsyncEngine, network_id: str, account_id: str, limit: int
) -> list[dict[str, Any]]:
    """The newest balance changes of ``account_id``, newest first."""
    async with async_sessionmaker(engine)() as session:
        rows = await session.scalars(
            select(CreditEntryRow)
            .where(CreditEntryRow.network_id == network_id, CreditEntryRow.account_id == account_id)
            .order_by(CreditEntryRow.id.desc())
            .limit(limit)
        )
        return [
            {
                "kind": row.kind,
                "credits": credits(row.delta),
                "micro_credits": row.delta,
                "request_id": row.request_id,
                "created_at": row.created_at.isoformat(),
            }
            for row in rows
        ]


async def receipt_page(
    engine: AsyncEngine,
    network_id: str,
    *,
    limit: int,
    offset: int = 0,
    account_id: str | None = None,
    role: Role = "any",
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Settled receipts, newest first, filtered by party and model."""
    query = select(ReceiptRow).where(ReceiptRow.network_id == network_id)
    if account_id is not None:
        as_consumer = ReceiptRow.consumer_account == account_id
        as_seeder = ReceiptRow.seeder_account == account_id
        query = query.where(
            {"consumer": as_consumer, "seeder": as_seeder, "any": or_(as_consumer, as_seeder)}[role]
        )
    if model is not None:
        query = query.where(ReceiptRow.model == model)
    query = query.order_by(ReceiptRow.recorded_at.desc(), ReceiptRow.request_id).limit(limit).offset(offset)
    async with async_sessionmaker(engine)() as session:
        return [
            {
                "request_id": row.request_id,
                "model": row.model,
                "consumer": row.consumer_account,
                "seeder": row.seeder_account,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "price": credits(row.price),
                "micro_credits": row.price,
                "finished_at": row.finished_at.isoformat(),
                "recorded_at": row.recorded_at.isoformat(),
                "receipt": row.encoded.hex(),
            }
            for row in await session.scalars(query)
        ]
