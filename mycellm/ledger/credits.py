"""CreditBook: balances per account and network, changed only together with the receipt behind them.

Every change is one database transaction: the receipt row, one journal entry per party and the
balance updates commit together or not at all. A new member's initial grant is the only change
without a receipt; it is journalled as issued by the network, so the sum of all balances always
equals the sum of the grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mycellm.errors import MycellmError, PaymentRequiredError, ReceiptError
from mycellm.ledger.credit_tables import CreditAccountRow, CreditEntryRow, PendingReceiptRow, ReceiptRow
from mycellm.ledger.pricing import PriceTable, credits
from mycellm.ledger.receipts import CheckedReceipt, Receipt, check_receipt
from mycellm.ledger.store import INSERTS
from mycellm.ledger.tables import ServedRequestRow


class LedgerError(MycellmError):
    status = 503
    error_type = "server_error"
    code = "ledger_unavailable"


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    price: int
    deltas: dict[str, int]


PARALLEL_CHECK_MIN = 32
CHECK_THREADS = max(1, min(4, os.cpu_count() or 1))


def _now() -> datetime:
    return datetime.now(UTC)


class CreditBook:
    def __init__(self, engine: AsyncEngine, prices: PriceTable, network_id: str) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.prices = prices
        self.network_id = network_id
        # SQLite has one writer at a time and fails a second one that waits to upgrade its lock;
        # queueing writers here is what SQLite would do anyway, without the failures.
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            session = await stack.enter_async_context(self._sessions.begin())
            yield session

    # -- members --------------------------------------------------------------------------------

    async def _ensure_member(self, session: AsyncSession, account_id: str) -> None:
        """Open the account with the initial grant if it is new (inside the caller's transaction)."""
        now, grant = _now(), self.prices.initial_grant
        inserted = await session.execute(
            INSERTS[self._engine.dialect.name](CreditAccountRow)
            .values(network_id=self.network_id, account_id=account_id, balance=grant, created_at=now)
            .on_conflict_do_nothing(index_elements=["network_id", "account_id"])
        )
        if inserted.rowcount == 1:  # type: ignore[attr-defined]
            session.add(
                CreditEntryRow(
                    network_id=self.network_id,
                    account_id=account_id,
                    delta=grant,
                    kind="grant",
                    created_at=now,
                )
            )

    async def join(self, account_id: str) -> int:
        """Make ``account_id`` a member (granting it once); returns its balance."""
        try:
            async with self._transaction() as session:
                await self._ensure_member(session, account_id)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot open account {account_id[:12]}: {error}") from error
        return await self.balance(account_id)

    async def balance(self, account_id: str) -> int:
        """Micro-credits of ``account_id``; a member not seen yet would start with the grant."""
        async with self._sessions() as session:
            row = await session.get(CreditAccountRow, (self.network_id, account_id))
        return self.prices.initial_grant if row is None else row.balance

    async def require_funds(self, account_id: str, price: int) -> None:
        """PaymentRequiredError (402) with the balance and the price if ``account_id`` cannot pay."""
        balance = await self.balance(account_id)
        if balance < price:
            raise PaymentRequiredError(
                f"balance {credits(balance):.6f} credits does not cover the price {credits(price):.6f} credits",
                param="balance",
            )

    # -- settlement -------------------------------------------------------------------------------

    async def settle(
        self, receipt: Receipt, *, served_here: bool = False, observed: bool = False
    ) -> Settlement:
        """Record a receipt and move the credits it justifies, all in one transaction.

        ``served_here``: this node is the seeder, so the receipt must match a request it served.
        ``observed``: a receipt between two other parties, heard from the network. It is a fact both
        parties signed, so it is recorded even where this node's view of the consumer's balance is
        short (that view missed a receipt still on its way); its refusals are otherwise the same.
        Refused with ReceiptError (nothing changes): forged or tampered signatures, mispriced
        amounts, another network, a replay, a conflicting receipt for the same request, or a
        request this node did not serve. PaymentRequiredError if the consumer cannot pay.
        """
        (outcome,) = await self.settle_many([receipt], served_here=served_here, observed=observed)
        if isinstance(outcome, MycellmError):
            raise outcome
        return outcome

    async def settle_many(
        self, receipts: Sequence[Receipt], *, served_here: bool = False, observed: bool = False
    ) -> list[Settlement | MycellmError]:
        """Settle receipts in one transaction, in order; each is accepted or refused on its own.

        A refused receipt changes nothing; the accepted ones commit together with their balance
        changes (one commit for the batch is what makes settling fast).
        """
        outcomes: list[Settlement | MycellmError | None] = [None] * len(receipts)
        checked: list[tuple[int, CheckedReceipt, bytes]] = []
        indexed = list(enumerate(receipts))
        if len(indexed) < PARALLEL_CHECK_MIN:
            results = self._check(indexed)
        else:
            # Ed25519 verification releases the GIL: the cores check a large batch in parallel.
            parts = [indexed[start::CHECK_THREADS] for start in range(CHECK_THREADS)]
            done = await asyncio.gather(*(asyncio.to_thread(self._check, part) for part in parts))
            results = [result for part in done for result in part]
        for index, result in sorted(results, key=lambda pair: pair[0]):
            if isinstance(result, ReceiptError):
                outcomes[index] = result
            else:
                checked.append((index, *result))
        for attempt in range(2):
            try:
                async with self._transaction() as session:
                    settled = await self._apply(session, checked, served_here, observed)
                break
            except IntegrityError:  # a receipt of the batch was settled concurrently: look again
                if attempt:
                    raise LedgerError("receipts keep conflicting with concurrent settlements") from None
            except SQLAlchemyError as error:
                raise LedgerError(f"cannot settle receipts: {error}") from error
        for index, outcome in settled.items():
            outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _check(
        self, indexed: list[tuple[int, Receipt]]
    ) -> list[tuple[int, tuple[CheckedReceipt, bytes] | ReceiptError]]:
        results: list[tuple[int, tuple[CheckedReceipt, bytes] | ReceiptError]] = []
        for index, receipt in indexed:
            try:
                item = check_receipt(receipt, self.prices)
                if item.terms.network_id != self.network_id:
                    raise ReceiptError(
                        f"receipt is for network {item.terms.network_id!r}, not {self.network_id!r}"
                    )
                results.append((index, (item, receipt.to_bytes())))
            except ReceiptError as error:
                results.append((index, error))
        return results

    async def _apply(
        self,
        session: AsyncSession,
        checked: list[tuple[int, CheckedReceipt, bytes]],
        served_here: bool,
        observed: bool = False,
    ) -> dict[int, Settlement | MycellmError]:
        outcomes: dict[int, Settlement | MycellmError] = {}
        request_ids = [item.request_id for _, item, _ in checked]
        existing = dict(
            (
                await session.execute(
                    select(ReceiptRow.request_id, ReceiptRow.encoded).where(
                        ReceiptRow.network_id == self.network_id, ReceiptRow.request_id.in_(request_ids)
                    )
                )
            ).all()
        )
        admissible: list[tuple[int, CheckedReceipt, bytes]] = []
        for index, item, encoded in checked:
            try:
                if item.request_id in existing:
                    raise self._duplicate(existing[item.request_id], encoded, item.request_id)
                if served_here:
                    await self._check_served(session, item)
            except MycellmError as error:
                outcomes[index] = error
                continue
            existing[item.request_id] = encoded  # a second copy later in the batch is a replay
            admissible.append((index, item, encoded))
        parties = sorted({account for _, item, _ in admissible for account in item.deltas()})
        for account in parties:  # one lock order for every transaction: no deadlocks
            await self._ensure_member(session, account)
        balances = dict(
            (
                await session.execute(
                    select(CreditAccountRow.account_id, CreditAccountRow.balance)
                    .where(
                        CreditAccountRow.network_id == self.network_id,
                        CreditAccountRow.account_id.in_(parties),
                    )
                    .order_by(CreditAccountRow.account_id)
                    .with_for_update()
                )
            ).all()
        )
        net: dict[str, int] = {}
        entries: list[dict[str, object]] = []
        rows: list[dict[str, object]] = []
        now = _now()
        for index, item, encoded in admissible:
            terms, consumer = item.terms, item.consumer.account_id
            if balances[consumer] < terms.price and not observed:
                outcomes[index] = PaymentRequiredError(
                    f"balance {credits(balances[consumer]):.6f} credits does not cover the price "
                    f"{credits(terms.price):.6f} credits",
                    param="balance",
                )
                continue
            deltas = item.deltas()
            for account, delta in deltas.items():
                balances[account] += delta
                net[account] = net.get(account, 0) + delta
                entries.append(self._entry(item, account, delta, now))
            rows.append(self._receipt_row(item, encoded, now))
            outcomes[index] = Settlement(request_id=terms.request_id, price=terms.price, deltas=deltas)
        # Core executemany inserts: the ORM's unit of work costs more than the signatures.
        if rows:
            connection = await session.connection()
            await connection.execute(insert(ReceiptRow), rows)
            await connection.execute(insert(CreditEntryRow), entries)
            # A receipt this node was waiting for is no longer pending: same transaction.
            await connection.execute(
                delete(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id,
                    PendingReceiptRow.request_id.in_([row["request_id"] for row in rows]),
                )
            )
        for account in sorted(net):
            await session.execute(
                update(CreditAccountRow)
                .where(CreditAccountRow.network_id == self.network_id, CreditAccountRow.account_id == account)
                .values(balance=CreditAccountRow.balance + net[account])
            )
        return outcomes

    @staticmethod
    def _duplicate(existing: bytes, encoded: bytes, request_id: str) -> ReceiptError:
        if existing == encoded:
            return ReceiptError(f"receipt {request_id} is already settled", code="receipt_replayed")
        return ReceiptError(
            f"another receipt is already settled for request {request_id}", code="receipt_conflict"
        )

    async def _check_served(self, session: AsyncSession, checked: CheckedReceipt) -> None:
        terms = checked.terms
        served = await session.get(ServedRequestRow, terms.request_id)
        if served is None or served.outcome != "ok":
            raise ReceiptError(
                f"this node did not serve request {terms.request_id}", code="receipt_unjustified"
            )
        if (served.model, served.prompt_tokens, served.completion_tokens) != (
            terms.model,
            terms.prompt_tokens,
            terms.completion_tokens,
        ):
            raise ReceiptError(
                f"receipt {terms.request_id} claims {terms.model} {terms.prompt_tokens}+{terms.completion_tokens} "
                f"tokens; this node served {served.model} {served.prompt_tokens}+{served.completion_tokens}",
                code="receipt_unjustified",
            )

    def _entry(self, checked: CheckedReceipt, account: str, delta: int, now: datetime) -> dict[str, object]:
        consumer, seeder = checked.consumer.account_id, checked.seeder.account_id
        kind = "spend" if account == consumer else "earn" if account == seeder else "relay"
        return {
            "network_id": self.network_id,
            "account_id": account,
            "delta": delta,
            "kind": kind,
            "request_id": checked.request_id,
            "created_at": now,
        }

    def _receipt_row(self, checked: CheckedReceipt, encoded: bytes, now: datetime) -> dict[str, object]:
        terms = checked.terms
        return {
            "network_id": self.network_id,
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

    # -- receipts this node waits for -----------------------------------------------------------

    async def remember_offer(self, request_id: str, peer_id: str, terms: bytes, signature: bytes) -> None:
        """Keep signed terms until their receipt is settled (a restart retries them)."""
        row = PendingReceiptRow(
            network_id=self.network_id,
            request_id=request_id,
            peer_id=peer_id,
            terms=terms,
            consumer_signature=signature,
            created_at=_now(),
        )
        try:
            async with self._transaction() as session:
                if await session.get(PendingReceiptRow, (self.network_id, request_id)) is None:
                    session.add(row)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot keep the terms of {request_id}: {error}") from error

    async def pending_offers(self, peer_id: str) -> list[tuple[str, bytes, bytes]]:
        """(request id, terms, consumer signature) of receipts still owed by ``peer_id``."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id, PendingReceiptRow.peer_id == peer_id
                )
            )
            return [(row.request_id, row.terms, row.consumer_signature) for row in rows]

    async def forget_offer(self, request_id: str) -> None:
        async with self._transaction() as session:
            await session.execute(
                delete(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id,
                    PendingReceiptRow.request_id == request_id,
                )
            )

    async def receipt(self, request_id: str) -> bytes | None:
        """The settled receipt of ``request_id`` (canonical CBOR), if there is one."""
        async with self._sessions() as session:
            row = await session.get(ReceiptRow, (self.network_id, request_id))
            return None if row is None else row.encoded

    # -- reading ----------------------------------------------------------------------------------

    async def is_settled(self, request_id: str) -> bool:
        async with self._sessions() as session:
            return await session.get(ReceiptRow, (self.network_id, request_id)) is not None

    async def balances(self) -> dict[str, int]:
        async with self._sessions() as session:
            rows = await session.execute(
                select(CreditAccountRow.account_id, CreditAccountRow.balance).where(
                    CreditAccountRow.network_id == self.network_id
                )
            )
            return {account: balance for account, balance in rows}
