"""What a seeder served its peers, kept in its database until each receipt settles.

Recorded when a paid request starts (with its hold and bound) and again when it finishes (with its
usage), so a receipt offered after the seeder restarted still settles, and a request that broke off
(the seeder died, or the consumer resumed it elsewhere) can still be paid for what it produced.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mycellm.ledger.credit_tables import PeerServedRow
from mycellm.ledger.pending import LedgerError
from mycellm.types import NetworkId, RequestId


@dataclass(frozen=True, slots=True)
class ServedRecord:
    """A request served to a peer; ``usage`` (prompt, completion) is None until it finished."""

    request_id: str
    peer_id: str
    consumer: bytes  # the consumer's device certificate
    model: str
    tier: str | None
    max_tokens: int | None
    hold: tuple[int, int, int] | None
    usage: tuple[int, int] | None = None


async def keep_served(session: AsyncSession, network_id: str, record: ServedRecord) -> None:
    """Write ``record`` (inside the caller's transaction): a new row, or the finished usage."""
    hold = record.hold or (None, None, None)
    usage = record.usage or (None, None)
    row = await session.get(PeerServedRow, (network_id, record.request_id))
    if row is None:
        row = PeerServedRow(network_id=network_id, request_id=record.request_id, started_at=datetime.now(UTC))
        session.add(row)
    row.peer_id, row.consumer, row.model, row.tier = (
        record.peer_id,
        record.consumer,
        record.model,
        record.tier,
    )
    row.max_tokens = record.max_tokens
    row.hold_seq, row.held_before, row.hold_price = hold
    row.prompt_tokens, row.completion_tokens = usage


class ServedRecords:
    """The CreditBook's records of requests served to peers (a mixin: the book's engine and network)."""

    network_id: NetworkId
    _sessions: async_sessionmaker[AsyncSession]
    _transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]]

    async def remember_served(self, record: ServedRecord) -> None:
        """Keep (or update, once finished) what this node serves a peer, until its receipt settles."""
        try:
            async with self._transaction() as session:
                await keep_served(session, self.network_id, record)
        except SQLAlchemyError as error:
            raise LedgerError(f"cannot keep what was served for {record.request_id}: {error}") from error

    async def served_record(self, request_id: RequestId) -> ServedRecord | None:
        async with self._sessions() as session:
            row = await session.get(PeerServedRow, (self.network_id, request_id))
        if row is None:
            return None
        hold = None if row.hold_seq is None else (row.hold_seq, row.held_before or 0, row.hold_price or 0)
        usage = None if row.completion_tokens is None else (row.prompt_tokens or 0, row.completion_tokens)
        return ServedRecord(
            row.request_id, row.peer_id, row.consumer, row.model, row.tier, row.max_tokens, hold, usage
        )
