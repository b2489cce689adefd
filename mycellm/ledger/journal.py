"""Rows of a settled receipt: the receipt itself, one journal entry per party; and the refusals of a copy."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from mycellm.errors import ReceiptError
from mycellm.ledger.receipts import CheckedReceipt
from mycellm.ledger.tables import ServedRequestRow


def duplicate(existing: bytes, encoded: bytes, request_id: str) -> ReceiptError:
    if existing == encoded:
        return ReceiptError(f"receipt {request_id} is already settled", code="receipt_replayed")
    return ReceiptError(
        f"another receipt is already settled for request {request_id}", code="receipt_conflict"
    )


async def check_served(session: AsyncSession, checked: CheckedReceipt) -> None:
    terms = checked.terms
    served = await session.get(ServedRequestRow, terms.request_id)
    if served is None or served.outcome != "ok":
        raise ReceiptError(f"this node did not serve request {terms.request_id}", code="receipt_unjustified")
    claimed = (terms.model, terms.prompt_tokens, terms.completion_tokens)
    if (served.model, served.prompt_tokens, served.completion_tokens) != claimed:
        raise ReceiptError(
            f"receipt {terms.request_id} claims {terms.model} {terms.prompt_tokens}+{terms.completion_tokens} "
            f"tokens; this node served {served.model} {served.prompt_tokens}+{served.completion_tokens}",
            code="receipt_unjustified",
        )


def entry_row(
    network_id: str, checked: CheckedReceipt, account: str, delta: int, now: datetime
) -> dict[str, object]:
    consumer, seeder = checked.consumer.account_id, checked.seeder.account_id
    kind = "spend" if account == consumer else "earn" if account == seeder else "relay"
    return {
        "network_id": network_id,
        "account_id": account,
        "delta": delta,
        "kind": kind,
        "request_id": checked.request_id,
        "created_at": now,
    }


def receipt_row(network_id: str, checked: CheckedReceipt, encoded: bytes, now: datetime) -> dict[str, object]:
    terms = checked.terms
    return {
        "network_id": network_id,
        "request_id": terms.request_id,
        "encoded": encoded,
        "consumer_account": checked.consumer.account_id,
        "seeder_account": checked.seeder.account_id,
        "model": terms.model,
        "prompt_tokens": terms.prompt_tokens,
        "completion_tokens": terms.completion_tokens,
        "price": terms.price,
        "finished_at": datetime.fromtimestamp(terms.finished_at_ms / 1000, UTC),
        "recorded_at": now,
    }
