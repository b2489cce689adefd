"""Tests for the node store on real SQLite: migration, idempotent writes, totals, order, restart."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mycellm.ledger.records import RequestTotals, ServedRequestRecord
from mycellm.ledger.store import Store

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


def database_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "x.db"


@pytest.fixture
async def store(database: Path) -> AsyncIterator[Store]:
    opened = await Store.open(database_url(database))
    yield opened
    await opened.close()


async def test_open_migrates_the_schema(database: Path) -> None:
    opened = await Store.open(database_url(database))
    await opened.close()
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
        version = connection.execute("select version_num from alembic_version").fetchall()
        columns = {row[1] for row in connection.execute("pragma table_info(served_requests)")}
    assert "served_requests" in tables
    assert version == [("0001",)]
    assert set(ServedRequestRecord.model_fields) == columns


async def test_open_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.db"
    opened = await Store.open(database_url(path))
    await opened.close()
    assert path.is_file()


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


async def test_records_survive_reopening_the_file(database: Path) -> None:
    first = await Store.open(database_url(database))
    await first.record_request(record("before-restart", prompt_tokens=7, completion_tokens=3))
    await first.close()

    second = await Store.open(database_url(database))
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
