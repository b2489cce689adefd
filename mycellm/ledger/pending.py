"""Receipts a node waits for: the terms it signed as consumer, kept until their receipt is settled."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mycellm.errors import MycellmError
from mycellm.ledger.credit_tables import PendingReceiptRow
from mycellm.types import NetworkId, PeerId, RequestId


class LedgerError(MycellmError):
    status = 503
    error_type = "server_error"
    code = "ledger_unavailable"


class PendingOffers:
    """The CreditBook's offers still owed a countersignature (a restart retries them)."""

    network_id: NetworkId
    _sessions: async_sessionmaker[AsyncSession]
    _transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]

    async def remember_offer(
        self, request_id: RequestId, peer_id: PeerId, terms: bytes, signature: bytes
    ) -> None:
        """Keep signed terms until their receipt is settled (a restart retries them)."""
        row = PendingReceiptRow(
            network_id=self.network_id,
            request_id=request_id,
            peer_id=peer_id,
            terms=terms,
            consumer_signature=signature,
            created_at=datetime.now(UTC),
        )
        try:
            async with self._transaction() as session:
                if await session.get(PendingReceiptRow, (self.network_id, request_id)) is None:
                    session.add(row)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot keep the terms of {request_id}: {error}") from error

    async def pending_offers(self, peer_id: PeerId) -> list[tuple[RequestId, bytes, bytes]]:
        """(request id, terms, consumer signature) of receipts still owed by ``peer_id``."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id, PendingReceiptRow.peer_id == peer_id
                )
            )
            return [(RequestId(row.request_id), row.terms, row.consumer_signature) for row in rows]

    async def forget_offer(self, request_id: RequestId) -> None:
        async with self._transaction() as session:
            await session.execute(
                delete(PendingReceiptRow).where(
                    PendingReceiptRow.network_id == self.network_id,
                    PendingReceiptRow.request_id == request_id,
                )
            )
