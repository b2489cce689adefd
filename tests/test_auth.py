"""The ingress side of API keys without Ray: the gate over a real key book (anonymous rule, both headers,
scopes, rates, revocation, lockout), the bounded limits, and budgets reserved and settled."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mycellm.api.auth import Caller, KeyGate, error_headers, exposure_problem, is_loopback
from mycellm.api.budgets import BudgetKeeper, generation_bounds
from mycellm.api.keys import mint_key
from mycellm.api.limits import FailureLockout, RateWindow
from mycellm.api.tally import RequestTally
from mycellm.config import AuthSettings
from mycellm.errors import (
    AuthenticationError,
    BudgetExceededError,
    PermissionDeniedError,
    RateLimitedError,
)
from mycellm.ledger.api_keys import ApiKeyBook, ApiKeyRecord
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.store import Store
from mycellm.routing.ranking import Route
from mycellm.types import GenerationRequest, ModelInfo, RequestId, Usage

REFRESH_S = 0.05


class Clock:
    """The wall clock the gate and the limits read, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def book(tmp_path: Path) -> AsyncIterator[ApiKeyBook]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    yield ApiKeyBook(store.engine)
    await store.close()


def gate_over(book: ApiKeyBook, clock: Clock, host: str = "127.0.0.1", **auth: Any) -> KeyGate:
    async def load(used: dict[str, float]) -> list[ApiKeyRecord]:
        await book.touch(used)
        return await book.keys()

    return KeyGate(AuthSettings(**auth), host, load, clock=clock, refresh_s=REFRESH_S)


async def create(book: ApiKeyBook, clock: Clock, *scopes: str, **terms: Any) -> tuple[str, ApiKeyRecord]:
    key, record = mint_key(scopes=scopes or ("inference",), now=clock.now, **terms)  # type: ignore[arg-type]
    await book.create(record)
    return key, record


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def refused(gate: KeyGate, headers: dict[str, str], route: str, source: str = "10.0.0.1") -> Any:
    with pytest.raises((AuthenticationError, PermissionDeniedError, RateLimitedError)) as caught:
        await gate.admit(headers, source, route)
    return caught.value


async def test_loopback_is_open_until_the_first_key_then_keys_are_required(book: ApiKeyBook) -> None:
    clock = Clock()
    gate = gate_over(book, clock)
    for headers in ({}, bearer("unused"), {"x-api-key": "sk-anything"}):
        caller = await gate.admit(headers, "127.0.0.1", "chat_completions")
        assert caller.key_id is None and "admin" in caller.scopes
    wrong, _ = mint_key(scopes=("inference",), now=clock.now)
    assert (await refused(gate, bearer(wrong), "chat_completions")).code == "invalid_api_key"
    key, record = await create(book, clock, network="lab")
    await asyncio.sleep(REFRESH_S * 2)  # created offline: seen at the next reload
    assert (await refused(gate, {}, "chat_completions")).code == "missing_api_key"
    assert (await refused(gate, bearer("unused"), "chat_completions")).code == "invalid_api_key"
    for headers in (bearer(key), {"x-api-key": key}, {"authorization": f"bearer {key}", "x-api-key": key}):
        caller = await gate.admit(headers, "127.0.0.1", "chat_completions")
        assert (caller.key_id, caller.network, caller.scopes) == (record.key_id, "lab", {"inference"})
    # A key in one header and junk in the other: the key counts; two different keys: refused.
    assert (
        await gate.admit({**bearer("unused"), "x-api-key": key}, "h", "list_models")
    ).key_id == record.key_id
    other, _ = await create(book, clock)
    conflict = await refused(gate, {**bearer(key), "x-api-key": other}, "list_models")
    assert conflict.code == "conflicting_api_keys"
    assert (await gate.admit({}, "127.0.0.1", "health")).key_id is None  # always open


async def test_settings_override_the_rule(book: ApiKeyBook) -> None:
    clock = Clock()
    closed = gate_over(book, clock, allow_anonymous=False)
    assert (await refused(closed, {}, "list_models")).status == 401
    key, _ = await create(book, clock)
    exposed = gate_over(book, clock, host="0.0.0.0")
    assert (await refused(exposed, {}, "list_models")).code == "missing_api_key"
    assert (await exposed.admit(bearer(key), "10.0.0.2", "list_models")).key_id is not None
    open_gate = gate_over(book, clock, host="0.0.0.0", allow_anonymous=True, anonymous_scopes=("inference",))
    assert (await open_gate.admit({}, "10.0.0.2", "list_models")).key_id is None
    assert (await refused(open_gate, {}, "node_status")).code == "missing_api_key"
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert (await refused(open_gate, bearer(wrong), "list_models")).code == "invalid_api_key"


async def test_scopes_rates_and_revocation(book: ApiKeyBook) -> None:
    clock = Clock()
    gate = gate_over(book, clock)
    inference, record = await create(book, clock, "inference", rpm=3)
    reader, _ = await create(book, clock, "read")
    admin, _ = await create(book, clock, "admin")
    assert isinstance(await refused(gate, bearer(inference), "node_status"), PermissionDeniedError)
    assert isinstance(await refused(gate, bearer(reader), "chat_completions"), PermissionDeniedError)
    assert isinstance(await refused(gate, bearer(admin), "metrics"), PermissionDeniedError)
    assert (await gate.admit(bearer(reader), "h", "metrics")).key_id is not None
    assert (await gate.admit(bearer(admin), "h", "create_key")).key_id is not None
    for _ in range(3):
        await gate.admit(bearer(inference), "h", "embeddings")
    limited = await refused(gate, bearer(inference), "embeddings")
    assert isinstance(limited, RateLimitedError) and error_headers(limited) == {"Retry-After": "60"}
    clock.now += 60.5
    await gate.admit(bearer(inference), "h", "embeddings")
    await book.revoke(record.key_id, clock.now)  # as the offline CLI does, behind the gate's back
    await asyncio.sleep(REFRESH_S * 2)
    revoked = await refused(gate, bearer(inference), "embeddings")
    assert revoked.code == "api_key_revoked" and error_headers(revoked) == {
        "WWW-Authenticate": 'Bearer realm="mycellm"'
    }
    await asyncio.sleep(REFRESH_S * 2)  # the uses were noted in the book
    used = await book.key(record.key_id)
    assert used is not None and used.last_used_at == clock.now


async def test_a_key_created_a_moment_ago_works_at_once(book: ApiKeyBook) -> None:
    clock = Clock()
    gate = gate_over(book, clock)
    gate._refresh_s = 3600  # the cache would be stale for an hour
    await gate.admit({}, "h", "list_models")  # loads the (empty) table
    key, record = await create(book, clock)
    assert (await gate.admit(bearer(key), "h", "list_models")).key_id == record.key_id


async def test_a_source_that_keeps_failing_is_locked_out(book: ApiKeyBook) -> None:
    clock = Clock()
    gate = gate_over(book, clock, lockout_failures=10, lockout_window_s=60, lockout_s=60)
    key, _ = await create(book, clock)
    for attempt in range(9):  # unknown ids, and the known id with wrong secrets
        wrong = f"mck_{attempt:016x}_{'A' * 43}" if attempt < 2 else f"{key[:21]}{attempt:043d}"
        assert isinstance(await refused(gate, bearer(wrong), "list_models"), AuthenticationError)
    assert (await refused(gate, bearer("nope"), "list_models")).code == "too_many_failures"
    locked = await refused(gate, bearer(key), "list_models")  # even with a valid key, while locked
    assert isinstance(locked, RateLimitedError) and error_headers(locked) == {"Retry-After": "60"}
    assert (await gate.admit(bearer(key), "10.0.0.9", "list_models")).key_id is not None  # another source
    for _ in range(20):
        await refused(gate, {}, "list_models")  # a missing key is no failure
    clock.now += 61
    assert (await gate.admit(bearer(key), "10.0.0.1", "list_models")).key_id is not None


def test_the_lockout_table_is_bounded_and_keeps_live_lockouts() -> None:
    lockout = FailureLockout(failures=2, window_s=60, lockout_s=60, max_sources=3)
    now = 1000.0
    assert lockout.fail("a", now) is None
    assert lockout.fail("a", now) is not None  # locked
    assert lockout.fail("b", now) is None and lockout.fail("c", now) is None
    for number in range(1000):  # a flood of addresses: each newcomer is refused, none is kept
        refusal = lockout.fail(f"flood-{number}", now + 1)
        assert isinstance(refusal, RateLimitedError)
    assert len(lockout) == 3
    with pytest.raises(RateLimitedError):
        lockout.check("a", now + 30)  # the live lockout survived the flood
    assert lockout.fail("newcomer", now + 61) is None  # the old entries expired: room again
    assert len(lockout) == 1
    lockout.check("a", now + 61)
    disabled = FailureLockout(failures=0, window_s=60, lockout_s=60, max_sources=3)
    assert all(disabled.fail("a", now) is None for _ in range(100)) and len(disabled) == 0


def test_the_rate_window_slides() -> None:
    window = RateWindow()
    window.admit("k", 2, 0.0)
    window.admit("k", 2, 30.0)
    with pytest.raises(RateLimitedError) as limited:
        window.admit("k", 2, 59.0)
    assert limited.value.retry_after_s == pytest.approx(1.0)
    window.admit("k", 2, 60.5)
    window.forget(set())
    window.admit("k", 2, 61.0)
    window.admit("k", 2, 61.0)


def test_exposure_and_loopback() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.0.2.1", "node.example.org", ""))
    settings = AuthSettings()
    assert exposure_problem(settings, "127.0.0.1", 0) is None
    problem = exposure_problem(settings, "0.0.0.0", 0)
    assert problem is not None and "mycellm keys create" in problem and "allow_anonymous: true" in problem
    assert exposure_problem(settings, "0.0.0.0", 1) is None
    assert exposure_problem(AuthSettings(allow_anonymous=True), "0.0.0.0", 0) is None
    assert exposure_problem(AuthSettings(allow_anonymous=False), "0.0.0.0", 0) is not None


# -- budgets ------------------------------------------------------------------------------------

MODEL = ModelInfo(name="tiny-model", backend="llama_cpp", context_tokens=2048, tier="tiny")
ROUTES = [Route(kind="local", target="worker-0", model=MODEL)]
PRICES = PriceTable()


def generation(request_id: str, max_tokens: int | None = 8) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId(request_id),
        model=MODEL.name,
        messages=({"role": "user", "content": "Hello there"},),
        max_tokens=max_tokens,
    )


def keeper_over(book: ApiKeyBook) -> BudgetKeeper:
    return BudgetKeeper(
        PRICES,
        book.reserve,
        lambda key_id, request_id, actual, now, reserved: book.settle(
            key_id, request_id, actual, now, reserved=reserved
        ),
    )


async def settled(book: ApiKeyBook, key_id: str) -> ApiKeyRecord:
    for _ in range(100):
        record = await book.key(key_id)
        assert record is not None
        if record.reserved_micro == 0:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError("the reservation was not released")


def test_worst_cases_are_bounded_by_the_context() -> None:
    prompt, completion = generation_bounds(generation("r", None), MODEL)
    assert completion == 2048 and 256 < prompt < 400
    assert generation_bounds(generation("r", 100_000), MODEL)[1] == 2048
    long = generation("r").model_copy(update={"messages": ({"role": "user", "content": "x" * 10_000},)})
    assert generation_bounds(long, MODEL)[0] == 2048


async def test_a_budget_is_reserved_before_work_and_settled_at_the_real_price(book: ApiKeyBook) -> None:
    clock = Clock()
    keeper = keeper_over(book)
    worst = keeper.worst_case(ROUTES, generation("x"))[0]
    _, record = await create(book, clock, budget_micro=2 * worst)
    caller = Caller.of(record)
    tallies = [RequestTally(RequestId(f"chatcmpl-{n}"), "chat", MODEL.name) for n in range(3)]
    await keeper.hold(tallies[0], caller, ROUTES, generation("a"))
    await keeper.hold(tallies[1], caller, ROUTES, generation("b"))
    with pytest.raises(BudgetExceededError):
        await keeper.hold(tallies[2], caller, ROUTES, generation("c"))
    assert len(keeper) == 2
    served = tallies[0]
    served.route = ROUTES[0]
    served.count(Usage(prompt_tokens=10, completion_tokens=4))
    keeper.settle(served)
    keeper.settle(served)  # once only
    state = await settled_partly(book, record.key_id, worst)
    assert state.spent_on(state.day) == PRICES.price(MODEL.name, "tiny", 10, 4)
    del tallies[1]  # a stream that never started: its tally is collected unsettled
    gc.collect()
    state = await settled(book, record.key_id)
    assert state.spent_on(state.day) == PRICES.price(MODEL.name, "tiny", 10, 4) and len(keeper) == 0


async def settled_partly(book: ApiKeyBook, key_id: str, reserved: int) -> ApiKeyRecord:
    for _ in range(100):
        record = await book.key(key_id)
        assert record is not None
        if record.reserved_micro == reserved:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError("the settlement did not arrive")


async def test_a_stream_that_ended_without_usage_pays_for_what_it_delivered(book: ApiKeyBook) -> None:
    clock = Clock()
    keeper = keeper_over(book)
    _, limited = await create(book, clock, budget_micro=10**9)
    _, free = await create(book, clock)
    for record in (limited, free):
        served = RequestTally(RequestId(f"chatcmpl-{record.key_id}"), "chat", MODEL.name)
        await keeper.hold(served, Caller.of(record), ROUTES, generation("g", max_tokens=50))
        served.route = ROUTES[0]
        served.delivered_bytes = 20  # the client left before the final chunk
        served.fail(asyncio.CancelledError())
        keeper.settle(served)
    worst, prompt, _ = keeper.worst_case(ROUTES, generation("g", max_tokens=50))
    expected = PRICES.price(MODEL.name, "tiny", prompt, 20)
    assert expected < worst
    assert (await settled(book, limited.key_id)).spent_micro == expected
    for _ in range(100):
        counted = await book.key(free.key_id)
        if counted is not None and counted.spent_micro:
            break
        await asyncio.sleep(0.02)
    assert counted is not None and counted.spent_micro == expected and counted.reserved_micro == 0
