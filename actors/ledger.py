"""Ledger: the only writer of the node store."""

from __future__ import annotations

from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.store import Store


class Ledger:
    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._store: Store | None = None

    async def start(self) -> None:
        self._store = await Store.open(self._database_url)

    async def stop(self) -> None:
        if self._store is not None:
            await self._store.close()

    def _require(self) -> Store:
        assert self._store is not None, "Ledger.start was not awaited"
        return self._store

    async def record_request(self, record: ServedRequestRecord) -> bool:
        return await self._require().record_request(record)

    async def recent_requests(self, limit: int = 50) -> list[ServedRequestRecord]:
        return await self._require().recent_requests(limit)

    async def totals(self) -> RequestTotals:
        return await self._require().totals()
