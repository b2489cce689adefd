"""Async repository over the node store: open (and migrate) the database, write and read records."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, CursorResult, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from mycellm.errors import MycellmError
from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.tables import ServedRequestRow

MIGRATIONS = Path(__file__).parent / "migrations"

# INSERT ... ON CONFLICT DO NOTHING, in the dialect of each supported backend.
INSERTS: dict[str, Callable[..., Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}

# Alembic runs a migration through module-level proxies (alembic.context, alembic.op), so two
# upgrades interleaved on one event loop corrupt each other: they take turns, per loop.
_MIGRATION_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """Write-ahead logging: a commit appends to the log with one fsync (instead of a rollback
    journal's several), and readers (the ingress's views, a CLI command) never wait for the writer.
    Synchronous FULL keeps every commit durable through a power loss: a hold recorded is never lost."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


class StoreError(MycellmError):
    """The database refused an operation or could not be reached."""

    status = 503
    error_type = "server_error"
    code = "store_unavailable"


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _upgrade(connection: Connection) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no offset: store UTC so times sort correctly, and read them back as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Store:
    """One database (SQLite via aiosqlite or PostgreSQL via asyncpg, chosen by URL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect and bring the schema to the newest migration."""
        if url.startswith("sqlite"):
            database = url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create_async_engine(url)
        except ImportError as error:
            raise StoreError(
                f"no driver for {url.split(':', 1)[0]}: {error} (pip install 'mycellm[postgres]')"
            ) from error
        except SQLAlchemyError as error:
            raise StoreError(f"cannot open the database: {error}") from error
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if engine.dialect.name not in INSERTS:
            raise StoreError(f"unsupported database {engine.dialect.name}: use SQLite or PostgreSQL")
        lock = _MIGRATION_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        try:
            async with lock, engine.begin() as connection:
                await connection.run_sync(_upgrade)
        except (SQLAlchemyError, OSError) as error:
            await engine.dispose()
            raise StoreError(f"cannot open the database: {error}") from error
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The database engine, for the other repositories of the same store (credits)."""
        return self._engine

    async def record_request(self, record: ServedRequestRecord) -> bool:
        """Store a served request; False if that request id is already recorded (idempotent)."""
        values = record.model_dump()
        values["created_at"] = _utc(record.created_at)
        # ON CONFLICT DO NOTHING rather than catching IntegrityError: a failed statement aborts the
        # whole transaction on PostgreSQL, and any other integrity error is a real error.
        insert = INSERTS[self._engine.dialect.name](ServedRequestRow.__table__)
        statement = insert.values(values).on_conflict_do_nothing(index_elements=["request_id"])
        try:
            async with self._sessions.begin() as session:
                result = cast("CursorResult[Any]", await session.execute(statement))
        except SQLAlchemyError as error:
            raise StoreError(f"cannot record request {record.request_id}: {error}") from error
        return bool(result.rowcount)

    async def recent_requests(self, limit: int = 50) -> list[ServedRequestRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ServedRequestRow).order_by(ServedRequestRow.created_at.desc()).limit(limit)
            )
            return [
                ServedRequestRecord.model_validate(
                    {column: getattr(row, column) for column in ServedRequestRecord.model_fields}
                    | {"created_at": _utc(row.created_at)}
                )
                for row in rows
            ]

    async def totals(self) -> RequestTotals:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(ServedRequestRow.prompt_tokens), 0),
                        func.coalesce(func.sum(ServedRequestRow.completion_tokens), 0),
                        func.count().filter(ServedRequestRow.outcome != "ok"),
                    )
                )
            ).one()
        return RequestTotals(requests=row[0], prompt_tokens=row[1], completion_tokens=row[2], failures=row[3])
