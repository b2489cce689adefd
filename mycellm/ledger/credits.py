"""CreditBook: balances per account and network, changed only together with the receipt behind them.

Every change is one database transaction: the receipt row, one journal entry per party and the balance
updates commit together or not at all. A member's initial grant is the only change without a
receipt; it is given once per account and network (a primary key), only to an account whose
membership the caller has proven, and journalled as issued by the network, so the sum of all
balances always equals the sum of the grants. No balance goes negative: a receipt heard from the
network that its consumer cannot pay here is parked (``mycellm/ledger/parked.py``) and applied once
receipts fund the consumer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mycellm.errors import MycellmError, PaymentRequiredError, ReceiptError
from mycellm.ledger import parked
from mycellm.ledger.admissions import HoldAdmissions
from mycellm.ledger.credit_tables import (
    CreditAccountRow,
    CreditEntryRow,
    CreditGrantRow,
    PeerServedRow,
    PendingReceiptRow,
    ReceiptRow,
)
from mycellm.ledger.journal import check_served, duplicate, entry_row, receipt_row
from mycellm.ledger.pending import LedgerError, PendingOffers
from mycellm.ledger.pricing import PriceTable, credits
from mycellm.ledger.receipts import CheckedReceipt, Receipt, check_receipt, check_time
from mycellm.ledger.served import ServedRecords
from mycellm.ledger.spend_book import SpendChains, note
from mycellm.ledger.spends import Spend, receipt_spend
from mycellm.ledger.store import INSERTS
from mycellm.ledger.writes import Writes
from mycellm.types import AccountId, NetworkId, RequestId

__all__ = ["CreditBook", "LedgerError", "Settlement", "unaffordable"]


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    price: int
    deltas: dict[str, int]
    parked: bool = False  # heard, kept, not applied: its consumer cannot pay it here yet


# A receipt that passed its checks: (its index in the batch, what was checked, its encoding).
_Checked = tuple[int, CheckedReceipt, bytes]
# Whose receipt: this node's own (a party to it), heard from the network, or parked here before.
_Source = Literal["own", "heard", "parked"]


@dataclass
class _Applied:
    outcomes: dict[int, Settlement | MycellmError] = field(default_factory=dict)
    credited: set[str] = field(default_factory=set)  # accounts whose parked receipts may apply now


PARALLEL_CHECK_MIN = 32
CHECK_THREADS = max(1, min(4, os.cpu_count() or 1))
UNPARK_ROUNDS = 64  # applying a parked receipt credits its seeder, whose own parked ones follow


def _now() -> datetime:
    return datetime.now(UTC)


def unaffordable(balance: int, price: int) -> PaymentRequiredError:
    """The 402 of a balance (micro-credits) that does not cover a price."""
    return PaymentRequiredError(
        f"balance {credits(balance):.6f} credits does not cover the price {credits(price):.6f} credits",
        param="balance",
    )


class CreditBook(PendingOffers, SpendChains, ServedRecords, HoldAdmissions):
    """The credits of one network in one database; in this process, the CreditKeeper of settlement."""

    def __init__(self, engine: AsyncEngine, prices: PriceTable, network_id: NetworkId) -> None:
        self._engine = engine
        writes = Writes(engine)  # every book of this engine queues its writers on SQLite's one lock
        self._sessions, self._transaction = writes.sessions, writes.transaction
        self.prices = prices
        self.network_id = network_id
        self._fresh_proofs = []

    # -- members --------------------------------------------------------------------------------

    async def _open_account(self, session: AsyncSession, account_id: str) -> None:
        """Open the account at zero if it is new (inside the caller's transaction): no grant."""
        await session.execute(
            INSERTS[self._engine.dialect.name](CreditAccountRow)
            .values(network_id=self.network_id, account_id=account_id, balance=0, created_at=_now())
            .on_conflict_do_nothing(index_elements=["network_id", "account_id"])
        )

    async def _grant(self, session: AsyncSession, account_id: AccountId) -> bool:
        """Give the initial grant if this account never had it (inside the caller's transaction)."""
        now, grant = _now(), self.prices.initial_grant
        inserted = await session.execute(
            INSERTS[self._engine.dialect.name](CreditGrantRow)
            .values(network_id=self.network_id, account_id=account_id, amount=grant, created_at=now)
            .on_conflict_do_nothing(index_elements=["network_id", "account_id"])
        )
        if inserted.rowcount != 1:  # type: ignore[attr-defined]
            return False
        await self._open_account(session, account_id)
        await session.execute(
            update(CreditAccountRow)
            .where(CreditAccountRow.network_id == self.network_id, CreditAccountRow.account_id == account_id)
            .values(balance=CreditAccountRow.balance + grant)
        )
        session.add(
            CreditEntryRow(
                network_id=self.network_id, account_id=account_id, delta=grant, kind="grant", created_at=now
            )
        )
        return True

    async def join(self, account_id: AccountId) -> int:
        """Make ``account_id`` a member, granting it once; returns its balance.

        Only for an account whose membership of this network is proven (a link the gate admitted
        in it, this node's own account): an account only seen in receipts is never granted.
        """
        try:
            async with self._transaction() as session:
                granted = await self._grant(session, account_id)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot open account {account_id[:12]}: {error}") from error
        if granted:
            await self._unpark({account_id})
        return await self.balance(account_id)

    async def balance(self, account_id: AccountId) -> int:
        """Micro-credits of ``account_id``; zero for an account not seen yet."""
        async with self._sessions() as session:
            row = await session.get(CreditAccountRow, (self.network_id, account_id))
        return 0 if row is None else row.balance

    async def require_funds(self, account_id: AccountId, price: int) -> None:
        """PaymentRequiredError (402) with the balance and the price if ``account_id`` cannot pay."""
        balance = await self.balance(account_id)
        if balance < price:
            raise unaffordable(balance, price)

    # -- settlement -------------------------------------------------------------------------------

    async def settle(
        self, receipt: Receipt, *, served_here: bool = False, observed: bool = False
    ) -> Settlement:
        """Record a receipt and move the credits it justifies, all in one transaction.

        ``served_here``: this node is the seeder, so the receipt must match a request it served.
        ``observed``: a receipt between two other parties, heard from the network. If this node's
        view of the consumer's balance is short (a receipt still on its way, or parties colluding
        to create credits) it is parked, not applied: the Settlement says ``parked``, and it applies
        once receipts crediting the consumer arrive. Refused with ReceiptError (nothing changes):
        forged or tampered signatures, mispriced amounts, another network, a time too far from now,
        a replay, a conflicting receipt for the same request, or a request this node did not serve.
        PaymentRequiredError if the consumer of this node's own receipt cannot pay.
        """
        (outcome,) = await self.settle_many([receipt], served_here=served_here, observed=observed)
        if isinstance(outcome, MycellmError):
            raise outcome
        return outcome

    async def record_receipt(self, receipt: Receipt, *, observed: bool = False) -> bool:
        """``settle``, but a replay (a retried exchange, gossip heard twice) answers False, not an error."""
        try:
            await self.settle(receipt, observed=observed)
        except ReceiptError as error:
            if error.code == "receipt_replayed":
                return False
            raise
        return True

    async def settle_many(
        self, receipts: Sequence[Receipt], *, served_here: bool = False, observed: bool = False
    ) -> list[Settlement | MycellmError]:
        """Settle receipts in one transaction, in order; each is accepted or refused on its own.

        A refused receipt changes nothing; the accepted ones commit together with their balance
        changes (one commit for the batch is what makes settling fast). Right after, the parked
        receipts of every account they credited are tried again.
        """
        outcomes: list[Settlement | MycellmError | None] = [None] * len(receipts)
        checked: list[_Checked] = []
        indexed = list(enumerate(receipts))
        if len(indexed) < PARALLEL_CHECK_MIN:
            results = self._check(indexed, observed)
        else:
            # Ed25519 verification releases the GIL: the cores check a large batch in parallel.
            parts = [indexed[start::CHECK_THREADS] for start in range(CHECK_THREADS)]
            done = await asyncio.gather(*(asyncio.to_thread(self._check, part, observed) for part in parts))
            results = [result for part in done for result in part]
        for index, result in sorted(results, key=lambda pair: pair[0]):
            if isinstance(result, ReceiptError):
                outcomes[index] = result
            else:
                checked.append((index, *result))
        applied = await self._commit(checked, served_here, "heard" if observed else "own")
        for index, outcome in applied.outcomes.items():
            outcomes[index] = outcome
        await self._unpark(applied.credited)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _commit(self, checked: list[_Checked], served_here: bool, source: _Source) -> _Applied:
        for attempt in range(2):
            try:
                async with self._transaction() as session:
                    return await self._apply(session, checked, served_here, source)
            except IntegrityError:  # a receipt of the batch was settled concurrently: look again
                if attempt:
                    raise LedgerError("receipts keep conflicting with concurrent settlements") from None
            except SQLAlchemyError as error:
                raise LedgerError(f"cannot settle receipts: {error}") from error
        raise AssertionError("unreachable")

    async def _unpark(self, credited: Iterable[str]) -> None:
        """Apply the parked receipts that the credits of ``credited`` pay for now, oldest first."""
        accounts = set(credited)
        for _ in range(UNPARK_ROUNDS):
            if not accounts:
                return
            async with self._sessions() as session:
                encodings = await parked.parked_of(session, self.network_id, sorted(accounts))
            if not encodings:
                return
            receipts = [(index, Receipt.from_bytes(encoded)) for index, encoded in enumerate(encodings)]
            checked = [
                (index, *result) for index, result in self._check(receipts, None) if isinstance(result, tuple)
            ]
            applied = await self._commit(checked, False, "parked")
            accounts = applied.credited

    def _check(
        self, indexed: list[tuple[int, Receipt]], observed: bool | None
    ) -> list[tuple[int, tuple[CheckedReceipt, bytes] | ReceiptError]]:
        """Signatures, amounts, network, and (``observed`` not None: a receipt arriving now) its time."""
        results: list[tuple[int, tuple[CheckedReceipt, bytes] | ReceiptError]] = []
        for index, receipt in indexed:
            try:
                item = check_receipt(receipt, self.prices)
                if item.terms.network_id != self.network_id:
                    raise ReceiptError(
                        f"receipt is for network {item.terms.network_id!r}, not {self.network_id!r}"
                    )
                if observed is not None:
                    check_time(item.terms, heard=observed)
                results.append((index, (item, receipt.to_bytes())))
            except ReceiptError as error:
                results.append((index, error))
        return results

    async def _apply(
        self, session: AsyncSession, checked: list[_Checked], served_here: bool, source: _Source
    ) -> _Applied:
        applied = _Applied()
        outcomes = applied.outcomes
        admissible = await self._admissible(session, checked, served_here, source, outcomes)
        balances = await self._locked_balances(session, admissible)
        net: dict[str, int] = {}
        entries: list[dict[str, object]] = []
        rows: list[dict[str, object]] = []
        spends: list[Spend] = []  # a receipt states a spend whether or not it applies here yet
        now = _now()
        for index, item, encoded in admissible:
            terms, consumer = item.terms, item.consumer.account_id
            if (spend := receipt_spend(terms, item.consumer, encoded)) is not None:
                spends.append(spend)
            if balances[consumer] < terms.price:
                if source == "own":
                    outcomes[index] = unaffordable(balances[consumer], terms.price)
                elif source == "heard":
                    try:
                        await parked.park(session, self.network_id, item, encoded, now)
                        outcomes[index] = Settlement(terms.request_id, terms.price, {}, parked=True)
                    except ReceiptError as error:
                        outcomes[index] = error
                continue  # a parked receipt still short stays parked
            deltas = item.deltas()
            for account, delta in deltas.items():
                balances[account] += delta
                net[account] = net.get(account, 0) + delta
                entries.append(entry_row(self.network_id, item, account, delta, now))
            rows.append(receipt_row(self.network_id, item, encoded, now))
            outcomes[index] = Settlement(request_id=terms.request_id, price=terms.price, deltas=deltas)
        # Core executemany inserts: the ORM's unit of work costs more than the signatures.
        if rows:
            settled = [str(row["request_id"]) for row in rows]
            connection = await session.connection()
            await connection.execute(insert(ReceiptRow), rows)
            await connection.execute(insert(CreditEntryRow), entries)
            # A receipt this node was waiting for, or had parked, is neither any more: same transaction.
            await connection.execute(
                delete(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id, PendingReceiptRow.request_id.in_(settled)
                )
            )
            await parked.unpark(session, self.network_id, settled)
            await connection.execute(  # what this node served for them is paid for now
                delete(PeerServedRow).where(
                    PeerServedRow.network_id == self.network_id, PeerServedRow.request_id.in_(settled)
                )
            )
        for account in sorted(net):
            await session.execute(
                update(CreditAccountRow)
                .where(CreditAccountRow.network_id == self.network_id, CreditAccountRow.account_id == account)
                .values(balance=CreditAccountRow.balance + net[account])
            )
        applied.credited = {account for account, delta in net.items() if delta > 0}
        await note(session, self._engine.dialect.name, self.network_id, spends, self._fresh_proofs)
        return applied

    async def _admissible(
        self,
        session: AsyncSession,
        checked: list[_Checked],
        served_here: bool,
        source: _Source,
        outcomes: dict[int, Settlement | MycellmError],
    ) -> list[_Checked]:
        """The receipts not settled before (nor earlier in the batch); the refusals go to ``outcomes``.

        A receipt parked here is heard again as a replay; as this node's own receipt, or when its
        consumer is credited, it is tried again."""
        request_ids = [item.request_id for _, item, _ in checked]
        found = await session.execute(
            select(ReceiptRow.request_id, ReceiptRow.encoded).where(
                ReceiptRow.network_id == self.network_id, ReceiptRow.request_id.in_(request_ids)
            )
        )
        existing = dict(found.all())
        waiting = await parked.parked_encodings(session, self.network_id, request_ids)
        admissible: list[_Checked] = []
        for index, item, encoded in checked:
            try:
                if item.request_id in existing:
                    raise duplicate(existing[item.request_id], encoded, item.request_id)
                if item.request_id in waiting and (source == "heard" or waiting[item.request_id] != encoded):
                    raise duplicate(waiting[item.request_id], encoded, item.request_id)
                if served_here:
                    await check_served(session, item)
            except MycellmError as error:
                outcomes[index] = error
                continue
            existing[item.request_id] = encoded  # a second copy later in the batch is a replay
            admissible.append((index, item, encoded))
        return admissible

    async def _locked_balances(self, session: AsyncSession, admissible: list[_Checked]) -> dict[str, int]:
        """The balances of every party, locked for this transaction (new accounts opened at zero)."""
        parties = sorted({account for _, item, _ in admissible for account in item.deltas()})
        for account in parties:  # one lock order for every transaction: no deadlocks
            await self._open_account(session, account)
        rows = await session.execute(
            select(CreditAccountRow.account_id, CreditAccountRow.balance)
            .where(CreditAccountRow.network_id == self.network_id, CreditAccountRow.account_id.in_(parties))
            .order_by(CreditAccountRow.account_id)
            .with_for_update()
        )
        return dict(rows.all())

    async def receipt(self, request_id: RequestId) -> bytes | None:
        """The settled receipt of ``request_id`` (canonical CBOR), if there is one."""
        async with self._sessions() as session:
            row = await session.get(ReceiptRow, (self.network_id, request_id))
            return None if row is None else row.encoded

    async def is_settled(self, request_id: RequestId) -> bool:
        async with self._sessions() as session:
            return await session.get(ReceiptRow, (self.network_id, request_id)) is not None

    async def parked(self) -> list[str]:
        """The request ids of the receipts parked here, unfunded."""
        async with self._sessions() as session:
            return await parked.parked_ids(session, self.network_id)

    async def balances(self) -> dict[str, int]:
        query = select(CreditAccountRow.account_id, CreditAccountRow.balance)
        async with self._sessions() as session:
            rows = await session.execute(query.where(CreditAccountRow.network_id == self.network_id))
            return {account: balance for account, balance in rows}
