"""Write transactions of the node store: one writer at a time per SQLite database in this process.

SQLite has one writer at a time and fails a second one that waits to upgrade its lock; the books
over one engine (the credits of every network, the API keys, an authority's memberships) queue
their writers on one lock instead, which is what SQLite would do anyway, without the failures.
PostgreSQL takes concurrent writers as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any, cast

from sqlalchemy import CursorResult
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

_WRITE_LOCKS: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


class Writes:
    """Sessions over one engine, and its write transactions (queued on SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.dialect = engine.dialect.name
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._lock = (
            _WRITE_LOCKS.setdefault(engine.sync_engine, asyncio.Lock()) if self.dialect == "sqlite" else None
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with contextlib.AsyncExitStack() as stack:
            if self._lock is not None:
                await stack.enter_async_context(self._lock)
            yield await stack.enter_async_context(self.sessions.begin())


def rowcount(result: Any) -> int:
    """The rows an UPDATE or DELETE touched."""
    return cast("CursorResult[Any]", result).rowcount
