"""Holds, checked and kept in one transaction: the seeder's admission of a paid request, the
consumer's record of the hold it signs.

Before any work, a seeder notes the releases a consumer shows and its hold, reads the account's
chain and balance, and keeps what it is about to serve; a consumer records its hold only if its
balance, less its open holds, pays it. Each is one call and one transaction, so a paid request's
first token waits for one round trip to the books on each side, not six.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mycellm.ledger.credit_tables import CreditAccountRow
from mycellm.ledger.pending import LedgerError
from mycellm.ledger.served import ServedRecord, keep_served
from mycellm.ledger.spend_book import Proof, SpendView, checked_spends, note, spend_view_in
from mycellm.types import AccountId, NetworkId


@dataclass(frozen=True, slots=True)
class HoldCheck:
    """What a seeder's books say of a hold it was shown, and whether it was admitted."""

    frauds: tuple[str, ...]  # accounts the statements shown prove to lie
    proofs: tuple[Proof, ...]  # fraud proofs found here since the last look, to pass on
    view: SpendView
    balance: int
    admitted: bool  # no fraud, the hold covers the price and the balance pays it: ``served`` is kept

    @property
    def available(self) -> int:
        """The balance less the consumer's parked receipts and its holds still open."""
        return self.balance - self.view.parked - self.view.outstanding


async def _balance(session: AsyncSession, network_id: str, account_id: str) -> int:
    row = await session.get(CreditAccountRow, (network_id, account_id))
    return 0 if row is None else row.balance


class HoldAdmissions:
    """The CreditBook's hold checks (a mixin: the book's engine, network and fresh proofs)."""

    network_id: NetworkId
    _engine: AsyncEngine
    _transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]
    _fresh_proofs: list[Proof]

    async def check_hold(
        self, account_id: AccountId, statements: list[bytes], price: int, served: ServedRecord
    ) -> HoldCheck:
        """Note ``statements`` (releases shown, then the hold: the last), read ``account_id``'s chain
        before the hold and its balance, and keep ``served`` if the hold may be served at ``price``."""
        spends = checked_spends(self.network_id, statements)
        hold = spends[-1]
        try:
            async with self._transaction() as session:
                dialect = self._engine.dialect.name
                frauds = tuple(await note(session, dialect, self.network_id, spends, self._fresh_proofs))
                view = await spend_view_in(session, self.network_id, account_id, hold.seq, hold.held_before)
                balance = await _balance(session, self.network_id, account_id)
                available = balance - view.parked - view.outstanding
                admitted = (
                    not frauds and view.fraud is None and hold.max_price >= price and price <= available
                )
                if admitted:
                    await keep_served(session, self.network_id, served)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot check the hold of {served.request_id}: {error}") from error
        proofs, self._fresh_proofs[:] = tuple(self._fresh_proofs), []
        return HoldCheck(frauds, proofs, view, balance, admitted)

    async def record_hold(self, statement: bytes, open_total: int) -> int:
        """Record this node's own signed hold if its balance less ``open_total`` (its other open
        holds) pays the hold's price; the balance so left (negative: refused, nothing recorded)."""
        spend = checked_spends(self.network_id, [statement])[0]
        if spend.kind != "hold":
            raise LedgerError("only a hold is recorded this way")
        try:
            async with self._transaction() as session:
                left = (
                    await _balance(session, self.network_id, spend.account_id) - open_total - spend.max_price
                )
                if left >= 0:
                    await note(
                        session, self._engine.dialect.name, self.network_id, [spend], self._fresh_proofs
                    )
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot record the hold of {spend.request_id}: {error}") from error
        return left
