"""The spend chains a CreditBook knows: statements by number, the frauds they prove, what is outstanding."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mycellm.errors import ReceiptError
from mycellm.ledger.credit_tables import ParkedReceiptRow, ReceiptRow, SpendFraudRow, SpendRow
from mycellm.ledger.spends import Kind, Spend, check_spend, evidence_spend
from mycellm.ledger.store import INSERTS
from mycellm.types import AccountId, NetworkId

logger = logging.getLogger(__name__)

ENDS = ("receipt", "release")


@dataclass(frozen=True, slots=True)
class SpendView:
    """What a seeder needs to know of a consumer's chain before it serves a hold."""

    outstanding: int  # held before this hold and not seen to end here, in micro-credits
    parked: int  # the consumer's heard receipts this node could not apply yet
    fraud: str | None  # why this account's chain is proven to lie, if it is


def _spend(row: SpendRow) -> Spend:
    return Spend(
        kind=row.kind,  # type: ignore[arg-type]
        network_id=row.network_id,
        account_id=row.account_id,
        seq=row.seq,
        request_id=row.request_id,
        held_before=row.held_before,
        max_price=row.max_price,
        evidence=row.evidence,
    )


Proof = tuple[Kind, bytes, Kind, bytes]  # two contradicting statements, each with its kind


async def _known(
    session: AsyncSession, network_id: str, spends: Sequence[Spend]
) -> dict[tuple[str, int], list[Spend]]:
    """The statements already recorded under the numbers of ``spends`` and their neighbours."""
    wanted: dict[str, set[int]] = {}
    for spend in spends:
        wanted.setdefault(spend.account_id, set()).update((spend.seq - 1, spend.seq, spend.seq + 1))
    known: dict[tuple[str, int], list[Spend]] = {}
    columns = (
        SpendRow.kind,
        SpendRow.seq,
        SpendRow.request_id,
        SpendRow.held_before,
        SpendRow.max_price,
        SpendRow.evidence,
    )
    for account, seqs in wanted.items():
        # One range per account (a batch's numbers are mostly consecutive); plain columns, no ORM.
        rows = await session.execute(
            select(*columns).where(
                SpendRow.network_id == network_id,
                SpendRow.account_id == account,
                SpendRow.seq.between(min(seqs), max(seqs)),
            )
        )
        for kind, seq, request_id, held_before, max_price, evidence in rows:
            if seq in seqs:
                stated = cast(Kind, kind)
                spend = Spend(stated, network_id, account, seq, request_id, held_before, max_price, evidence)
                known.setdefault((account, seq), []).append(spend)
    return known


def _row(network_id: str, spend: Spend, now: datetime) -> dict[str, object]:
    return {
        "network_id": network_id,
        "account_id": spend.account_id,
        "seq": spend.seq,
        "kind": spend.kind,
        "request_id": spend.request_id,
        "held_before": spend.held_before,
        "max_price": spend.max_price,
        # A receipt's bytes are kept once, with the receipt (``_evidence`` finds them there).
        "evidence": b"" if spend.kind == "receipt" else spend.evidence,
        "recorded_at": now,
    }


async def _evidence(session: AsyncSession, network_id: str, spend: Spend) -> bytes:
    """The signed bytes of a recorded statement: a receipt's are those of the receipt itself."""
    if spend.evidence or spend.kind != "receipt":
        return spend.evidence
    settled = await session.get(ReceiptRow, (network_id, spend.request_id))
    if settled is not None:
        return settled.encoded
    parked = await session.get(ParkedReceiptRow, (network_id, spend.request_id))
    return b"" if parked is None else parked.encoded


async def note(
    session: AsyncSession,
    dialect: str,
    network_id: str,
    spends: Sequence[Spend],
    found: list[Proof] | None = None,
) -> list[str]:
    """Record ``spends`` (inside the caller's transaction); the accounts newly proven to lie.

    Each is checked against the statements of the same number and of its two neighbours; a
    contradiction records the two statements as the account's fraud proof (and adds it to
    ``found``, to be passed on)."""
    if not spends:
        return []
    known = await _known(session, network_id, spends)
    now, inserts, frauds = datetime.now(UTC), [], []
    for spend in spends:
        neighbours = (
            other
            for seq in (spend.seq - 1, spend.seq, spend.seq + 1)
            for other in known.get((spend.account_id, seq), [])
        )
        for other in neighbours:
            reason = spend.contradicts(other)
            if reason is None:
                continue
            logger.warning("account %s proven to double spend: %s", spend.account_id[:12], reason)
            proof: Proof = (
                other.kind,
                await _evidence(session, network_id, other),
                spend.kind,
                spend.evidence,
            )
            if await record_proof(session, dialect, network_id, spend.account_id, reason, proof):
                frauds.append(spend.account_id)
                if found is not None:
                    found.append(proof)
            break
        same = known.setdefault((spend.account_id, spend.seq), [])
        if not any(other.kind == spend.kind for other in same):
            same.append(spend)
            inserts.append(_row(network_id, spend, now))
    if inserts:  # executemany of one cached statement: a multi-row VALUES would compile each time
        statement = INSERTS[dialect](SpendRow).on_conflict_do_nothing(
            index_elements=["network_id", "account_id", "seq", "kind"]
        )
        await session.execute(statement, inserts)
    return frauds


async def record_proof(
    session: AsyncSession, dialect: str, network_id: str, account_id: str, reason: str, proof: Proof
) -> bool:
    """Keep the first proof against an account; True if it is the first."""
    inserted = await session.execute(
        INSERTS[dialect](SpendFraudRow)
        .values(
            network_id=network_id,
            account_id=account_id,
            reason=reason[:200],
            first_kind=proof[0],
            first=proof[1],
            second_kind=proof[2],
            second=proof[3],
            detected_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["network_id", "account_id"])
    )
    return bool(inserted.rowcount == 1)  # type: ignore[attr-defined]


def checked_spends(network_id: str, statements: list[bytes]) -> list[Spend]:
    """Signed holds and releases, checked, all of ``network_id`` (else ReceiptError)."""
    spends = []
    for data in statements:
        spend = check_spend(data)[0]
        if spend.network_id != network_id:
            raise ReceiptError(
                f"a spend of network {spend.network_id!r}, not {network_id!r}", code="spend_invalid"
            )
        spends.append(spend)
    return spends


async def spend_view_in(
    session: AsyncSession, network_id: str, account_id: str, seq: int, held_before: int
) -> SpendView:
    """The account's chain before ``seq`` as this node knows it (inside the caller's session)."""
    ended = (
        select(SpendRow.seq, SpendRow.max_price)
        .where(
            SpendRow.network_id == network_id,
            SpendRow.account_id == account_id,
            SpendRow.seq < seq,
            SpendRow.kind.in_(ENDS),
        )
        .distinct()
        .subquery()
    )
    ended_sum = await session.scalar(select(func.coalesce(func.sum(ended.c.max_price), 0)))
    parked = await session.scalar(
        select(func.coalesce(func.sum(ParkedReceiptRow.price), 0)).where(
            ParkedReceiptRow.network_id == network_id,
            ParkedReceiptRow.consumer_account == account_id,
        )
    )
    fraud = await session.get(SpendFraudRow, (network_id, account_id))
    return SpendView(
        outstanding=max(0, held_before - int(ended_sum or 0)),
        parked=int(parked or 0),
        fraud=None if fraud is None else fraud.reason,
    )


class SpendChains:
    """The CreditBook's spend chains (a mixin: it shares the book's engine and network)."""

    network_id: NetworkId
    _engine: AsyncEngine
    _sessions: async_sessionmaker[AsyncSession]
    _transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]
    _fresh_proofs: list[Proof]  # proven here and not yet passed on (``take_proofs``)

    async def note_spends(self, statements: list[bytes]) -> list[str]:
        """Check and record signed holds and releases; the accounts they prove to lie."""
        spends = checked_spends(self.network_id, statements)
        async with self._transaction() as session:
            return await note(session, self._engine.dialect.name, self.network_id, spends, self._fresh_proofs)

    async def take_proofs(self) -> list[Proof]:
        """The fraud proofs found here since the last call, to pass on to the network."""
        proofs, self._fresh_proofs[:] = list(self._fresh_proofs), []
        return proofs

    async def record_fraud(self, proof: Proof) -> bool:
        """Keep a fraud proof heard from the network once it checks out; True if it is new here."""
        first, second = evidence_spend(proof[0], proof[1]), evidence_spend(proof[2], proof[3])
        reason = first.contradicts(second)
        if reason is None or first.network_id != self.network_id:
            raise ReceiptError("this is no proof of fraud in this network", code="spend_invalid")
        async with self._transaction() as session:
            return await record_proof(
                session, self._engine.dialect.name, self.network_id, first.account_id, reason, proof
            )

    async def spend_view(self, account_id: AccountId, seq: int, held_before: int) -> SpendView:
        async with self._sessions() as session:
            return await spend_view_in(session, self.network_id, account_id, seq, held_before)

    async def spend_head(self, account_id: AccountId) -> tuple[int, int]:
        """The account's next spend number and the total its holds took so far, as known here."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(SpendRow)
                    .where(SpendRow.network_id == self.network_id, SpendRow.account_id == account_id)
                    .order_by(SpendRow.seq.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        return (1, 0) if row is None else (row.seq + 1, row.held_before + row.max_price)

    async def open_holds(self, account_id: AccountId) -> list[tuple[int, str, int]]:
        """The account's holds with no receipt or release here: (seq, request id, max price)."""
        async with self._sessions() as session:
            ended = select(SpendRow.seq).where(
                SpendRow.network_id == self.network_id,
                SpendRow.account_id == account_id,
                SpendRow.kind.in_(ENDS),
            )
            rows = await session.execute(
                select(SpendRow.seq, SpendRow.request_id, SpendRow.max_price).where(
                    SpendRow.network_id == self.network_id,
                    SpendRow.account_id == account_id,
                    SpendRow.kind == "hold",
                    SpendRow.seq.not_in(ended),
                )
            )
            return [(int(seq), str(request_id), int(price)) for seq, request_id, price in rows]

    async def recent_ends(self, account_id: AccountId, limit: int) -> list[tuple[Kind, bytes]]:
        """The account's latest receipts and releases, newest first (to show a seeder)."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(SpendRow)
                .where(
                    SpendRow.network_id == self.network_id,
                    SpendRow.account_id == account_id,
                    SpendRow.kind.in_(ENDS),
                )
                .order_by(SpendRow.seq.desc())
                .limit(limit)
            )
            ends = [_spend(row) for row in rows.scalars()]
            found = [(end.kind, await _evidence(session, self.network_id, end)) for end in ends]
            return [(kind, evidence) for kind, evidence in found if evidence]

    async def fraud_proof(
        self, account_id: AccountId
    ) -> tuple[str, tuple[Kind, bytes], tuple[Kind, bytes]] | None:
        """The reason and the two contradicting statements that prove ``account_id`` lies, if any."""
        async with self._sessions() as session:
            row = await session.get(SpendFraudRow, (self.network_id, account_id))
        if row is None:
            return None
        return row.reason, (row.first_kind, row.first), (row.second_kind, row.second)  # type: ignore[return-value]
