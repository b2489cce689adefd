"""CreditKeeper: the node's ledger as settlement needs it, and the listeners told of what it settles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from mycellm.ledger.admissions import HoldCheck
from mycellm.ledger.receipts import Receipt
from mycellm.ledger.served import ServedRecord
from mycellm.ledger.spend_book import Proof
from mycellm.ledger.spends import Kind
from mycellm.types import AccountId, PeerId, RequestId


@runtime_checkable
class CreditKeeper(Protocol):
    """The node's ledger, as settlement needs it: a CreditBook, or the Ledger actor that owns one."""

    async def balance(self, account_id: AccountId) -> int: ...

    async def join(self, account_id: AccountId) -> int: ...

    async def record_receipt(self, receipt: Receipt, *, observed: bool = False) -> bool: ...

    async def remember_offer(
        self, request_id: RequestId, peer_id: PeerId, terms: bytes, signature: bytes
    ) -> None: ...

    async def pending_offers(self, peer_id: PeerId) -> list[tuple[RequestId, bytes, bytes]]: ...

    async def forget_offer(self, request_id: RequestId) -> None: ...

    async def receipt(self, request_id: RequestId) -> bytes | None: ...

    async def note_spends(self, statements: list[bytes]) -> list[str]: ...

    async def check_hold(
        self, account_id: AccountId, statements: list[bytes], price: int, served: ServedRecord
    ) -> HoldCheck: ...

    async def record_hold(self, statement: bytes, open_total: int) -> int: ...

    async def spend_head(self, account_id: AccountId) -> tuple[int, int]: ...

    async def open_holds(self, account_id: AccountId) -> list[tuple[int, str, int]]: ...

    async def recent_ends(self, account_id: AccountId, limit: int) -> list[tuple[Kind, bytes]]: ...

    async def take_proofs(self) -> list[Proof]: ...

    async def remember_served(self, record: ServedRecord) -> None: ...

    async def served_record(self, request_id: RequestId) -> ServedRecord | None: ...

    async def record_fraud(self, proof: Proof) -> bool: ...


# Told of every receipt settled here: (the receipt, the peer it came from or None), to pass it on.
ReceiptListener = Callable[[bytes, PeerId | None], None]
# Told of every fraud proof new here: (the proof, the peer it came from or None), to pass it on.
FraudListener = Callable[[Proof, PeerId | None], None]
