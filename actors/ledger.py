"""Ledger: the only writer of the node store (served requests, credits and the receipts behind them)."""

from __future__ import annotations

from typing import Any

from mycellm.ledger.audit import AuditReport, audit
from mycellm.ledger.credit_views import Role, receipt_page, recent_transfers
from mycellm.ledger.credits import CreditBook, Settlement
from mycellm.ledger.pricing import PriceSettings, PriceTable, credits
from mycellm.ledger.receipts import Receipt
from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.store import Store


class Ledger:
    def __init__(
        self, database_url: str, network_id: str = "public", prices: PriceSettings | None = None
    ) -> None:
        self._database_url = database_url
        self._network_id = network_id
        self._prices = PriceTable(prices)
        self._store: Store | None = None
        self._book: CreditBook | None = None

    async def start(self) -> None:
        self._store = await Store.open(self._database_url)
        self._book = CreditBook(self._store.engine, self._prices, self._network_id)

    async def stop(self) -> None:
        if self._store is not None:
            await self._store.close()

    def _require(self) -> Store:
        assert self._store is not None, "Ledger.start was not awaited"
        return self._store

    def _credits(self) -> CreditBook:
        assert self._book is not None, "Ledger.start was not awaited"
        return self._book

    async def record_request(self, record: ServedRequestRecord) -> bool:
        return await self._require().record_request(record)

    async def recent_requests(self, limit: int = 50) -> list[ServedRequestRecord]:
        return await self._require().recent_requests(limit)

    async def totals(self) -> RequestTotals:
        return await self._require().totals()

    # -- credits --------------------------------------------------------------------------------

    async def balance(self, account_id: str) -> int:
        return await self._credits().balance(account_id)

    async def join(self, account_id: str) -> int:
        return await self._credits().join(account_id)

    async def require_funds(self, account_id: str, price: int) -> None:
        await self._credits().require_funds(account_id, price)

    async def settle(self, receipt: bytes, served_here: bool = False, observed: bool = False) -> Settlement:
        return await self._credits().settle(
            Receipt.from_bytes(receipt), served_here=served_here, observed=observed
        )

    async def remember_offer(self, request_id: str, peer_id: str, terms: bytes, signature: bytes) -> None:
        await self._credits().remember_offer(request_id, peer_id, terms, signature)

    async def pending_offers(self, peer_id: str) -> list[tuple[str, bytes, bytes]]:
        return await self._credits().pending_offers(peer_id)

    async def forget_offer(self, request_id: str) -> None:
        await self._credits().forget_offer(request_id)

    async def receipt(self, request_id: str) -> bytes | None:
        return await self._credits().receipt(request_id)

    async def credits_view(self, account_id: str, limit: int = 20) -> dict[str, Any]:
        book = self._credits()
        balance = await book.balance(account_id)
        return {
            "network_id": self._network_id,
            "account_id": account_id,
            "balance": credits(balance),
            "micro_credits": balance,
            "initial_grant": credits(self._prices.initial_grant),
            "transfers": await recent_transfers(self._require().engine, self._network_id, account_id, limit),
        }

    async def receipts(
        self,
        limit: int = 50,
        offset: int = 0,
        account_id: str | None = None,
        role: Role = "any",
        model: str | None = None,
    ) -> list[dict[str, Any]]:
        return await receipt_page(
            self._require().engine,
            self._network_id,
            limit=limit,
            offset=offset,
            account_id=account_id,
            role=role,
            model=model,
        )

    async def audit(self) -> AuditReport:
        return await audit(self._require().engine, self._prices, self._network_id)
