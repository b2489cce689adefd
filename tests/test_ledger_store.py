"""Tests for the node store on real SQLite and real PostgreSQL: migration, idempotent writes, totals,
order, restart."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from mycellm.ledger import store as store_module
from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.store import MIGRATIONS, Store, StoreError

START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def record(request_id: str, **fields: Any) -> ServedRequestRecord:
    values: dict[str, Any] = {
        "request_id": request_id,
        "model": "smollm2-135m-instruct",
        "endpoint": "chat",
        "route_kind": "local",
        "route_target": "worker-0",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "time_to_first_token_ms": 12.5,
        "duration_ms": 80.0,
        "outcome": "ok",
        "created_at": START,
    }
    values.update(fields)
    return ServedRequestRecord(**values)


HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


async def schema(url: str) -> tuple[set[str], list[str], set[str]]:
    """Table names, alembic_version rows and served_requests columns, read past the Store."""

    def read(connection: Connection) -> tuple[set[str], list[str], set[str]]:
        inspector = inspect(connection)
        tables = set(inspector.get_table_names())
        versions = list(connection.execute(text("select version_num from alembic_version")).scalars())
        columns = {column["name"] for column in inspector.get_columns("served_requests")}
        return tables, versions, columns

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


async def test_open_migrates_the_schema(database_url: str) -> None:
    opened = await Store.open(database_url)
    await opened.close()
    tables, versions, columns = await schema(database_url)
    assert {"served_requests", "alembic_version"} <= tables
    assert versions == [HEAD]
    assert set(ServedRequestRecord.model_fields) == columns


async def test_opening_again_is_harmless(database_url: str) -> None:
    first = await Store.open(database_url)
    await first.record_request(record("kept"))
    await first.close()
    second = await Store.open(database_url)
    try:
        assert [item.request_id for item in await second.recent_requests()] == ["kept"]
    finally:
        await second.close()
    _, versions, _ = await schema(database_url)
    assert versions == [HEAD]


async def test_concurrent_opens_in_one_process_migrate_once(database_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(database_url) for _ in range(3)))
    for opened in stores:
        await opened.close()
    _, versions, _ = await schema(database_url)
    assert versions == [HEAD]


OPEN_ONCE = """
import asyncio, sys
from mycellm.ledger.store import Store

async def main() -> None:
    await (await Store.open(sys.argv[1])).close()

asyncio.run(main())
"""


async def test_concurrent_opens_in_separate_processes_migrate_once(database_url: str) -> None:
    # Nodes sharing one database may start together: the first migrates, the others wait for it.
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", OPEN_ONCE, database_url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(4)
    ]
    for process in processes:
        _, errors = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, errors.decode()
    _, versions, _ = await schema(database_url)
    assert versions == [HEAD]


async def test_a_failed_migration_leaves_the_database_as_it_was(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await Store.open(database_url)).close()
    before = await schema(database_url)
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "9999_broken.py").write_text(
        f"""
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = {HEAD!r}


def upgrade() -> None:
    op.create_table("half_made", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("SELECT no_such_column FROM served_requests")
"""
    )
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)
    with pytest.raises(StoreError):
        await Store.open(database_url)
    # Not even the first step of the broken migration stays, so a fixed one can run on this database.
    assert await schema(database_url) == before


async def test_open_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.db"
    opened = await Store.open(f"sqlite+aiosqlite:///{path}")
    await opened.close()
    assert path.is_file()


async def test_open_unreachable_postgresql_is_a_store_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port: the error is ours, not a raw OSError from the driver.
    with pytest.raises(StoreError):
        await Store.open(f"postgresql+asyncpg://nobody:wrong@127.0.0.1:{port}/nothing")


async def test_empty_store_totals_are_zero(store: Store) -> None:
    assert await store.totals() == RequestTotals(requests=0, prompt_tokens=0, completion_tokens=0, failures=0)
    assert await store.recent_requests() == []


async def test_record_request_is_idempotent_by_request_id(store: Store) -> None:
    first = record("req-1")
    assert await store.record_request(first) is True
    before = await store.totals()
    again = record("req-1", prompt_tokens=999, completion_tokens=999, outcome="engine_error")
    assert await store.record_request(again) is False
    assert await store.totals() == before
    assert await store.recent_requests() == [first]


async def test_totals_sum_tokens_and_count_failures(store: Store) -> None:
    records = [
        record("a", prompt_tokens=10, completion_tokens=1, outcome="ok"),
        record(
            "b",
            prompt_tokens=20,
            completion_tokens=2,
            outcome="engine_error",
            error_code="engine_unavailable",
        ),
        record("c", prompt_tokens=30, completion_tokens=0, outcome="client_error"),
        record("d", prompt_tokens=40, completion_tokens=4, outcome="cancelled"),
        record("e", prompt_tokens=50, completion_tokens=5, outcome="ok"),
    ]
    for item in records:
        assert await store.record_request(item)
    assert await store.totals() == RequestTotals(
        requests=5, prompt_tokens=150, completion_tokens=12, failures=3
    )


async def test_recent_requests_newest_first_and_limited(store: Store) -> None:
    for minute in (3, 0, 4, 1, 2):
        await store.record_request(record(f"req-{minute}", created_at=START + timedelta(minutes=minute)))
    recent = await store.recent_requests(limit=3)
    assert [item.request_id for item in recent] == ["req-4", "req-3", "req-2"]
    everything = await store.recent_requests()
    assert [item.request_id for item in everything] == ["req-4", "req-3", "req-2", "req-1", "req-0"]


async def test_recent_requests_round_trip_every_field(store: Store) -> None:
    original = record(
        "full",
        endpoint="embedding",
        route_kind="peer",
        route_target="ab" * 32,
        time_to_first_token_ms=None,
        outcome="engine_error",
        error_code="engine_unavailable",
    )
    await store.record_request(original)
    (stored,) = await store.recent_requests()
    assert stored == original
    assert stored.created_at.utcoffset() == timedelta(0)


async def test_recent_requests_order_by_instant_across_offsets(store: Store) -> None:
    # 13:30 at +02:00 is 11:30 UTC: older than 12:00 UTC although its wall clock reads later.
    eastern = record("eastern", created_at=datetime(2025, 1, 1, 13, 30, tzinfo=timezone(timedelta(hours=2))))
    utc = record("utc", created_at=START)
    await store.record_request(eastern)
    await store.record_request(utc)
    recent = await store.recent_requests()
    assert [item.request_id for item in recent] == ["utc", "eastern"]
    assert recent[1].created_at == eastern.created_at


async def test_records_survive_reopening_the_database(database_url: str) -> None:
    first = await Store.open(database_url)
    await first.record_request(record("before-restart", prompt_tokens=7, completion_tokens=3))
    await first.close()

    second = await Store.open(database_url)
    try:
        assert [item.request_id for item in await second.recent_requests()] == ["before-restart"]
        assert await second.totals() == RequestTotals(
            requests=1, prompt_tokens=7, completion_tokens=3, failures=0
        )
        # The id is still known after the restart: recording it again changes nothing.
        assert await second.record_request(record("before-restart")) is False
        assert await second.record_request(record("after-restart")) is True
        assert (await second.totals()).requests == 2
    finally:
        await second.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_tokens": -1},
        {"completion_tokens": -5},
        {"duration_ms": -0.5},
        {"time_to_first_token_ms": -1.0},
        {"outcome": "exploded"},
        {"endpoint": "images"},
        {"route_kind": "carrier-pigeon"},
        {"request_id": ""},
        {"request_id": "x" * 129},
        {"unexpected": 1},
    ],
)
def test_record_rejects_bad_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        record(fields.pop("request_id", "req-1"), **fields)
