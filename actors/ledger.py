"""Ledger: the only writer of the node store (served requests, credits and the receipts behind them)."""

from __future__ import annotations

from typing import Any

from actors.api_key_ledger import ApiKeyCalls
from mycellm.config import PriceSettings
from mycellm.errors import MycellmError
from mycellm.ledger.admissions import HoldCheck
from mycellm.ledger.api_keys import ApiKeyBook
from mycellm.ledger.audit import AuditReport, audit
from mycellm.ledger.credit_views import Role, receipt_page, recent_transfers
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceTable, credits
from mycellm.ledger.receipts import Receipt
from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.served import ServedRecord
from mycellm.ledger.spend_book import Proof
from mycellm.ledger.spends import Kind
from mycellm.ledger.store import Store
from mycellm.types import AccountId, NetworkId, PeerId, RequestId


class Ledger(ApiKeyCalls):
    """The node's store: served requests, the credits of its networks with the receipts behind them,
    and the API keys of its HTTP callers (their calls are ``ApiKeyCalls``').

    State: the Store (its database engine) and one CreditBook per network (``open_book``), both opened by ``start``
    and closed by ``stop``; nothing else is kept between calls, so a restarted Ledger is whole.
    Callers: the Recorder (served requests), the PeerManager (the CreditKeeper methods of
    settlement, through one adapter), the ingress (read-only views). Idempotent: ``join``,
    ``record_request`` (by request id), ``remember_offer``, ``forget_offer`` and
    ``record_receipt`` (a receipt already settled answers False and changes nothing); reads have
    no effects.
    """

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._store: Store | None = None
        self._books: dict[NetworkId, CreditBook] = {}
        self._default: NetworkId | None = None

    async def start(self) -> None:
        self._store = await Store.open(self._database_url)
        self._api_keys = ApiKeyBook(self._store.engine)
        await self._api_keys.release_reservations()  # nothing runs yet: what a crash left is free again

    async def stop(self) -> None:
        if self._store is not None:
            await self._store.close()

    def _require(self) -> Store:
        assert self._store is not None, "Ledger.start was not awaited"
        return self._store

    async def open_book(self, network_id: NetworkId, prices: PriceSettings, default: bool = False) -> None:
        """Keep ``network_id``'s credits, priced by its description (again: its newer prices)."""
        self._books[network_id] = CreditBook(self._require().engine, PriceTable(prices), network_id)
        if default or self._default is None:
            self._default = network_id

    def _credits(self, network_id: NetworkId | None = None) -> CreditBook:
        chosen = network_id or self._default
        book = self._books.get(chosen) if chosen is not None else None
        if book is None:
            raise MycellmError(f"this node keeps no books of network {str(chosen)[:16]}")
        return book

    async def record_request(self, record: ServedRequestRecord) -> bool:
        return await self._require().record_request(record)

    async def recent_requests(self, limit: int = 50) -> list[ServedRequestRecord]:
        return await self._require().recent_requests(limit)

    async def totals(self) -> RequestTotals:
        return await self._require().totals()

    # -- credits: settlement's CreditKeeper, as the CreditBook answers it ------------------------

    async def balance(self, account_id: AccountId, *, network_id: NetworkId | None = None) -> int:
        return await self._credits(network_id).balance(account_id)

    async def join(self, account_id: AccountId, *, network_id: NetworkId | None = None) -> int:
        return await self._credits(network_id).join(account_id)

    async def record_receipt(
        self, receipt: Receipt, *, observed: bool = False, network_id: NetworkId | None = None
    ) -> bool:
        return await self._credits(network_id).record_receipt(receipt, observed=observed)

    async def remember_offer(
        self,
        request_id: RequestId,
        peer_id: PeerId,
        terms: bytes,
        signature: bytes,
        *,
        network_id: NetworkId | None = None,
    ) -> None:
        await self._credits(network_id).remember_offer(request_id, peer_id, terms, signature)

    async def pending_offers(
        self, peer_id: PeerId, *, network_id: NetworkId | None = None
    ) -> list[tuple[RequestId, bytes, bytes]]:
        return await self._credits(network_id).pending_offers(peer_id)

    async def forget_offer(self, request_id: RequestId, *, network_id: NetworkId | None = None) -> None:
        await self._credits(network_id).forget_offer(request_id)

    async def receipt(self, request_id: RequestId, *, network_id: NetworkId | None = None) -> bytes | None:
        return await self._credits(network_id).receipt(request_id)

    async def require_funds(
        self, account_id: AccountId, price: int, *, network_id: NetworkId | None = None
    ) -> None:
        await self._credits(network_id).require_funds(account_id, price)

    # -- spend chains -----------------------------------------------------------------------------

    async def note_spends(self, statements: list[bytes], *, network_id: NetworkId | None = None) -> list[str]:
        return await self._credits(network_id).note_spends(statements)

    async def check_hold(
        self,
        account_id: AccountId,
        statements: list[bytes],
        price: int,
        served: ServedRecord,
        *,
        network_id: NetworkId | None = None,
    ) -> HoldCheck:
        return await self._credits(network_id).check_hold(account_id, statements, price, served)

    async def record_hold(
        self, statement: bytes, open_total: int, *, network_id: NetworkId | None = None
    ) -> int:
        return await self._credits(network_id).record_hold(statement, open_total)

    async def spend_head(
        self, account_id: AccountId, *, network_id: NetworkId | None = None
    ) -> tuple[int, int]:
        return await self._credits(network_id).spend_head(account_id)

    async def open_holds(
        self, account_id: AccountId, *, network_id: NetworkId | None = None
    ) -> list[tuple[int, str, int]]:
        return await self._credits(network_id).open_holds(account_id)

    async def recent_ends(
        self, account_id: AccountId, limit: int, *, network_id: NetworkId | None = None
    ) -> list[tuple[Kind, bytes]]:
        return await self._credits(network_id).recent_ends(account_id, limit)

    async def remember_served(self, record: ServedRecord, *, network_id: NetworkId | None = None) -> None:
        await self._credits(network_id).remember_served(record)

    async def served_record(
        self, request_id: RequestId, *, network_id: NetworkId | None = None
    ) -> ServedRecord | None:
        return await self._credits(network_id).served_record(request_id)

    async def take_proofs(self, *, network_id: NetworkId | None = None) -> list[Proof]:
        return await self._credits(network_id).take_proofs()

    async def record_fraud(self, proof: Proof, *, network_id: NetworkId | None = None) -> bool:
        return await self._credits(network_id).record_fraud(proof)

    async def fraud_proof(
        self, account_id: AccountId, *, network_id: NetworkId | None = None
    ) -> tuple[str, tuple[Kind, bytes], tuple[Kind, bytes]] | None:
        return await self._credits(network_id).fraud_proof(account_id)

    # -- views ------------------------------------------------------------------------------------

    async def credits_view(
        self, account_id: AccountId, limit: int = 20, network_id: NetworkId | None = None
    ) -> dict[str, Any]:
        book = self._credits(network_id)
        balance = await book.balance(account_id)
        return {
            "network_id": book.network_id,
            "account_id": account_id,
            "balance": credits(balance),
            "micro_credits": balance,
            "initial_grant": credits(book.prices.initial_grant),
            "transfers": await recent_transfers(self._require().engine, book.network_id, account_id, limit),
        }

    async def receipts(
        self,
        limit: int = 50,
        offset: int = 0,
        account_id: str | None = None,
        role: Role = "any",
        model: str | None = None,
        network_id: NetworkId | None = None,
    ) -> list[dict[str, Any]]:
        return await receipt_page(
            self._require().engine,
            self._credits(network_id).network_id,
            limit=limit,
            offset=offset,
            account_id=account_id,
            role=role,
            model=model,
        )

    async def audit(self, network_id: NetworkId | None = None) -> AuditReport:
        book = self._credits(network_id)
        return await audit(self._require().engine, book.prices, book.network_id)
