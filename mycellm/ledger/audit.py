"""Audit of a credit ledger: every receipt re-verified, every balance recomputed from receipts and grants.

No balance may be negative, and the credits the accounts hold never exceed what was issued.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mycellm.errors import ReceiptError
from mycellm.ledger.credit_tables import CreditAccountRow, CreditEntryRow, CreditGrantRow, ReceiptRow
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.receipts import Receipt, check_receipt


@dataclass
class AuditReport:
    network_id: str
    receipts: int = 0
    accounts: int = 0
    issued: int = 0
    total_balance: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.total_balance == self.issued


@dataclass
class _Books:
    """What the journal and the receipts say each account should hold, built up pass by pass."""

    report: AuditReport
    expected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    journal: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    held: int = 0  # the sum of the positive balances: what the accounts can spend
    journal_by_request: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )


async def audit(engine: AsyncEngine, prices: PriceTable, network_id: str) -> AuditReport:
    """Recompute ``network_id``'s books; every disagreement becomes a line in ``problems``."""
    books = _Books(AuditReport(network_id=network_id))
    async with async_sessionmaker(engine)() as session:
        await _journal_pass(session, books, prices)
        await _receipt_pass(session, books, prices)
        await _balance_pass(session, books)
    report = books.report
    if report.total_balance != report.issued:
        report.problems.append(f"balances sum to {report.total_balance}, but {report.issued} was issued")
    if books.held > report.issued:  # negative balances behind credits created out of nothing
        report.problems.append(f"credits held ({books.held}) exceed the {report.issued} issued as grants")
    return report


async def _journal_pass(session: AsyncSession, books: _Books, prices: PriceTable) -> None:
    """Grants (each account once, of the configured size) and the journal entries of receipts."""
    report, network_id = books.report, books.report.network_id
    grants: dict[str, int] = defaultdict(int)
    for entry in await session.scalars(select(CreditEntryRow).where(CreditEntryRow.network_id == network_id)):
        books.journal[entry.account_id] += entry.delta
        if entry.kind == "grant":
            grants[entry.account_id] += 1
            report.issued += entry.delta
            books.expected[entry.account_id] += entry.delta
            if entry.delta != prices.initial_grant:
                report.problems.append(
                    f"grant of {entry.delta} to {entry.account_id[:12]} is not the configured grant"
                )
        elif entry.request_id is None:
            report.problems.append(f"{entry.kind} entry {entry.id} has no receipt")
        else:
            books.journal_by_request[entry.request_id][entry.account_id] += entry.delta
    report.problems.extend(
        f"account {account[:12]} was granted {count} times" for account, count in grants.items() if count > 1
    )
    recorded = set(
        await session.scalars(
            select(CreditGrantRow.account_id).where(CreditGrantRow.network_id == network_id)
        )
    )
    report.problems.extend(
        f"account {account[:12]}: its grant and the grants recorded disagree"
        for account in recorded.symmetric_difference(grants)
    )


async def _receipt_pass(session: AsyncSession, books: _Books, prices: PriceTable) -> None:
    """Every receipt verified again, zero-sum, and matched by its journal entries."""
    report, network_id = books.report, books.report.network_id
    for row in await session.scalars(select(ReceiptRow).where(ReceiptRow.network_id == network_id)):
        report.receipts += 1
        try:
            checked = check_receipt(Receipt.from_bytes(row.encoded), prices)
        except ReceiptError as error:
            report.problems.append(f"receipt {row.request_id}: {error.message}")
            continue
        terms = checked.terms
        if (terms.request_id, terms.network_id, terms.price) != (row.request_id, network_id, row.price):
            report.problems.append(f"receipt {row.request_id}: its row does not match its signed terms")
        deltas = checked.deltas()
        if sum(deltas.values()) != 0:
            report.problems.append(f"receipt {row.request_id} is not zero-sum")
        for account, delta in deltas.items():
            books.expected[account] += delta
        journalled = dict(books.journal_by_request.pop(row.request_id, {}))
        if journalled != deltas:
            report.problems.append(
                f"receipt {row.request_id}: journal {journalled} differs from the receipt {deltas}"
            )
    report.problems.extend(
        f"journal entries for request {request} have no receipt" for request in books.journal_by_request
    )


async def _balance_pass(session: AsyncSession, books: _Books) -> None:
    """Every balance against the receipts and grants, against the journal, and never negative."""
    report = books.report
    rows = await session.scalars(
        select(CreditAccountRow).where(CreditAccountRow.network_id == report.network_id)
    )
    for holder in rows:
        report.accounts += 1
        report.total_balance += holder.balance
        books.held += max(0, holder.balance)
        expected = books.expected.get(holder.account_id, 0)
        if holder.balance != expected:
            report.problems.append(
                f"account {holder.account_id[:12]}: balance {holder.balance}, receipts and grants give {expected}"
            )
        if holder.balance != books.journal.get(holder.account_id, 0):
            report.problems.append(f"account {holder.account_id[:12]}: balance differs from its journal")
        if holder.balance < 0:
            report.problems.append(f"account {holder.account_id[:12]} is negative")
