"""API keys on SQLite and PostgreSQL: created, listed and revoked; only digests at rest; tampered, unknown,
revoked and expired keys refused; budgets exact under concurrent reservations; refusals change nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from mycellm.api.keys import check_key, key_digest, key_id_of, key_view, mint_key
from mycellm.cli.app import app
from mycellm.errors import AuthenticationError, BudgetExceededError
from mycellm.ledger.api_keys import DAY_S, ApiKeyBook, ApiKeyRecord, KeyNotFoundError, utc_day
from mycellm.ledger.store import Store

NOW = 1_750_000_000.0
PRICE = 7_000  # micro-credits


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
def book(store: Store) -> ApiKeyBook:
    return ApiKeyBook(store.engine)


async def rows(store: Store) -> list[tuple[Any, ...]]:
    """Every column of every key row and reservation, as the database holds them."""
    async with store.engine.connect() as connection:
        keys = await connection.execute(text("SELECT * FROM api_keys ORDER BY key_id"))
        held = await connection.execute(text("SELECT * FROM api_key_reservations ORDER BY request_id"))
        return [tuple(row) for row in keys] + [tuple(row) for row in held]


async def new_key(book: ApiKeyBook, **terms: Any) -> tuple[str, ApiKeyRecord]:
    text_, record = mint_key(**({"scopes": ("inference",), "now": NOW} | terms))
    await book.create(record)
    return text_, record


async def test_keys_are_created_listed_and_revoked(book: ApiKeyBook) -> None:
    first, record = await new_key(book, name="ci", network="lab", budget_micro=5_000_000, rpm=60)
    _, other = await new_key(book, scopes=("admin", "read"), now=NOW + 1, expires_at=NOW + 3600)
    assert first.startswith(f"mck_{record.key_id}_") and len(first) == 4 + 16 + 1 + 43
    assert key_id_of(first) == record.key_id and record.digest == key_digest(first)
    listed = await book.keys()
    assert [key.key_id for key in listed] == [record.key_id, other.key_id]
    assert listed[0] == record and listed[1].scopes == ("admin", "read")
    assert await book.active_keys(NOW) == 2
    assert await book.active_keys(NOW + 3600) == 1  # the second expired
    revoked = await book.revoke(record.key_id, NOW + 10)
    assert revoked.revoked_at == NOW + 10
    assert (await book.revoke(record.key_id, NOW + 20)).revoked_at == NOW + 10  # the first time stays
    assert await book.active_keys(NOW) == 1
    with pytest.raises(KeyNotFoundError):
        await book.revoke("0" * 16, NOW)
    view = key_view(revoked, NOW + 30)
    assert view["active"] is False and view["budget"] == 5.0 and view["network"] == "lab"
    assert "digest" not in view and all(first not in str(value) for value in view.values())


async def test_the_secret_is_nowhere_in_the_database(
    book: ApiKeyBook, store: Store, database_url: str
) -> None:
    key, record = await new_key(book)
    secret = key.rsplit("_", 1)[1]
    stored = repr(await rows(store))
    assert record.key_id in stored
    assert secret not in stored and key not in stored
    if database_url.startswith("sqlite"):
        await store.close()
        raw = await asyncio.to_thread(Path(database_url.split("///", 1)[1]).read_bytes)
        assert secret.encode() not in raw and record.digest in raw


async def test_tampered_unknown_revoked_and_expired_keys_are_refused(book: ApiKeyBook) -> None:
    key, record = await new_key(book, expires_at=NOW + 60)
    known = {record.key_id: record}
    assert check_key(key, known, NOW) == record
    last = key[-1]
    tampered = [
        key[:-1] + ("A" if last != "A" else "B"),  # another secret
        key[:5] + ("0" if key[5] != "0" else "1") + key[6:],  # another id
        key + "A",  # too long
        key.upper(),
        "mck_" + record.key_id,
        "unused",
        "",
    ]
    for candidate in tampered:
        with pytest.raises(AuthenticationError) as refused:
            check_key(candidate, known, NOW)
        assert refused.value.code == "invalid_api_key" and refused.value.status == 401
    with pytest.raises(AuthenticationError) as expired:
        check_key(key, known, NOW + 60)
    assert expired.value.code == "api_key_expired"
    revoked = await book.revoke(record.key_id, NOW)
    with pytest.raises(AuthenticationError) as gone:
        check_key(key, {record.key_id: revoked}, NOW)
    assert gone.value.code == "api_key_revoked"
    other, _ = mint_key(scopes=("inference",), now=NOW)
    with pytest.raises(AuthenticationError):
        check_key(other, known, NOW)  # well formed, never created


async def test_a_hundred_concurrent_reservations_never_pass_the_budget(
    book: ApiKeyBook, store: Store
) -> None:
    budget = 10 * PRICE + PRICE // 2
    _, record = await new_key(book, budget_micro=budget)
    outcomes = await asyncio.gather(
        *(book.reserve(record.key_id, f"r{number}", PRICE, NOW) for number in range(100)),
        return_exceptions=True,
    )
    held = [f"r{number}" for number, outcome in enumerate(outcomes) if outcome is True]
    refused = [outcome for outcome in outcomes if outcome is not True]
    assert len(held) == 10
    assert all(isinstance(error, BudgetExceededError) and error.status == 402 for error in refused), refused[
        :3
    ]
    assert "budget" in str(refused[0]) and refused[0].code == "budget_exceeded"
    state = await book.key(record.key_id)
    assert state is not None and state.reserved_micro == 10 * PRICE and state.spent_micro == 0
    # Settled at what they really cost (here, less than the worst case): the budget frees up.
    settled = await asyncio.gather(
        *(book.settle(record.key_id, request, PRICE - 1000, NOW, reserved=True) for request in held)
    )
    assert all(settled)
    assert not await book.settle(record.key_id, held[0], PRICE, NOW, reserved=True)  # only once
    state = await book.key(record.key_id)
    assert state is not None and state.reserved_micro == 0 and state.spent_micro == 10 * (PRICE - 1000)
    assert state.spent_micro <= budget
    assert (await rows(store))[1:] == []  # no reservation left


async def test_refused_reservations_change_nothing(book: ApiKeyBook, store: Store) -> None:
    _, record = await new_key(book, budget_micro=PRICE)
    assert await book.reserve(record.key_id, "one", PRICE, NOW)
    assert not await book.reserve(record.key_id, "one", PRICE, NOW)  # a replay holds nothing more
    before = await rows(store)
    with pytest.raises(BudgetExceededError):
        await book.reserve(record.key_id, "two", 1, NOW)
    assert await rows(store) == before
    await book.revoke(record.key_id, NOW)
    before = await rows(store)
    with pytest.raises(AuthenticationError):
        await book.reserve(record.key_id, "three", 0, NOW)
    with pytest.raises(AuthenticationError):
        await book.reserve("f" * 16, "four", 0, NOW)
    assert await rows(store) == before


async def test_budgets_are_per_utc_day_and_keys_without_one_only_count(book: ApiKeyBook) -> None:
    _, record = await new_key(book, budget_micro=PRICE)
    assert await book.reserve(record.key_id, "a", PRICE, NOW)
    assert await book.settle(record.key_id, "a", PRICE, NOW, reserved=True)
    with pytest.raises(BudgetExceededError):
        await book.reserve(record.key_id, "b", 1, NOW)
    tomorrow = (utc_day(NOW) + 1) * DAY_S
    assert await book.reserve(record.key_id, "b", PRICE, tomorrow)  # a new day, a new budget
    state = await book.key(record.key_id)
    assert state is not None and state.spent_on(utc_day(tomorrow)) == 0 and state.reserved_micro == PRICE
    _, free = await new_key(book)
    for number in range(3):
        assert await book.settle(free.key_id, f"f{number}", 100, NOW, reserved=False)
    counted = await book.key(free.key_id)
    assert counted is not None and counted.spent_on(utc_day(NOW)) == 300 and counted.reserved_micro == 0
    assert await book.release_reservations() == 1
    released = await book.key(record.key_id)
    assert released is not None and released.reserved_micro == 0


async def test_last_use_only_moves_forward(book: ApiKeyBook) -> None:
    _, record = await new_key(book)
    await book.touch({record.key_id: NOW + 5})
    await book.touch({record.key_id: NOW + 1, "0" * 16: NOW})  # older, and an unknown key: no change
    state = await book.key(record.key_id)
    assert state is not None and state.last_used_at == NOW + 5


def run_cli(data_dir: Path, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)], env={"COLUMNS": "250"})
    result.returncode = result.exit_code
    return result


def test_the_cli_prints_a_key_once_lists_without_secrets_and_revokes(tmp_path: Path) -> None:
    created = run_cli(
        tmp_path, "keys", "create", "--scope", "inference", "--scope", "read", "--budget", "2.5"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key_id_of(key)
    assert key_id is not None and "shown only now" in created.stderr
    as_json = run_cli(
        tmp_path, "keys", "create", "--scope", "admin", "--expires", "30d", "--name", "ops", "--json"
    )
    assert as_json.returncode == 0, as_json.stderr
    assert '"key": "mck_' in as_json.stdout and '"scopes": [\n    "admin"\n  ]' in as_json.stdout
    listed = run_cli(tmp_path, "keys", "list", "--json")
    assert listed.returncode == 0 and key_id in listed.stdout
    assert key.rsplit("_", 1)[1] not in listed.stdout and '"key"' not in listed.stdout
    table = run_cli(tmp_path, "keys", "list")
    assert key_id in table.stdout and "inference,read" in table.stdout and "ops" in table.stdout
    revoked = run_cli(tmp_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert '"active": false' in run_cli(tmp_path, "keys", "list", "--json").stdout
    unknown = run_cli(tmp_path, "keys", "revoke", "0" * 16)
    assert unknown.returncode == 1 and "no API key" in unknown.stderr
    for bad in (
        ["--scope", "everything"],
        ["--scope", "read", "--rpm", "0"],
        ["--scope", "read", "--expires", "soon"],
    ):
        refused = run_cli(tmp_path, "keys", "create", *bad)
        assert refused.returncode == 2, (bad, refused.stderr)
