"""Audit of a credit ledger: every receipt re-verified, every balance recomputed from receipts and grants."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from mycellm.errors import ReceiptError
from mycellm.ledger.credit_tables import CreditAccountRow, CreditEntryRow, ReceiptRow
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


async def audit(engine: AsyncEngine, prices: PriceTable, network_id: str) -> AuditReport:
    """Recompute ``network_id``'s books; every disagreement becomes a line in ``problems``."""
    report = AuditReport(network_id=network_id)
    expected: dict[str, int] = defaultdict(int)
    journal: dict[str, int] = defaultdict(int)
    journal_by_request: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    sessions = async_sessionmaker(engine)
    async with sessions() as session:
        for entry in await session.scalars(
            select(CreditEntryRow).where(CreditEntryRow.network_id == network_id)
        ):
            journal[entry.account_id] += entry.delta
            if entry.kind == "grant":
                report.issued += entry.delta
                expected[entry.account_id] += entry.delta
                if entry.delta != prices.initial_grant:
                    report.problems.append(
                        f"grant of {entry.delta} to {entry.account_id[:12]} is not the configured grant"
                    )
            elif entry.request_id is None:
                report.problems.append(f"{entry.kind} entry {entry.id} has no receipt")
            else:
                journal_by_request[entry.request_id][entry.account_id] += entry.delta
        grants: dict[str, int] = defaultdict(int)
        for entry in await session.scalars(
            select(CreditEntryRow).where(
                CreditEntryRow.network_id == network_id, CreditEntryRow.kind == "grant"
            )
        ):
            grants[entry.account_id] += 1
        report.problems.extend(
            f"account {account[:12]} was granted {count} times"
            for account, count in grants.items()
            if count > 1
        )
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
                expected[account] += delta
            journalled = {
                account: delta for account, delta in journal_by_request.pop(row.request_id, {}).items()
            }
            if journalled != deltas:
                report.problems.append(
                    f"receipt {row.request_id}: journal {journalled} differs from the receipt {deltas}"
                )
        report.problems.extend(
            f"journal entries for request {request} have no receipt" for request in journal_by_request
        )
        for holder in await session.scalars(
            select(CreditAccountRow).where(CreditAccountRow.network_id == network_id)
        ):
            report.accounts += 1
            report.total_balance += holder.balance
            if holder.balance != expected.get(holder.account_id, 0):
                report.problems.append(
                    f"account {holder.account_id[:12]}: balance {holder.balance}, receipts and grants give "
                    f"{expected.get(holder.account_id, 0)}"
                )
            if holder.balance != journal.get(holder.account_id, 0):
                report.problems.append(f"account {holder.account_id[:12]}: balance differs from its journal")
            if holder.balance < 0:
                report.problems.append(f"account {holder.account_id[:12]} is negative")
    if report.total_balance != report.issued:
        report.problems.append(f"balances sum to {report.total_balance}, but {report.issued} was issued")
    return report
