"""Credits cannot be minted, on SQLite and PostgreSQL: colluding receipts are parked until funded,
grants come only with a membership, admission prices an open request at its cap, receipts keep time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from mycellm.config import PriceSettings
from mycellm.errors import PaymentRequiredError, ReceiptError
from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms, check_receipt, draft_terms
from mycellm.ledger.store import Store
from mycellm.network.messages import InferenceMessage
from mycellm.network.settlement import Settler
from mycellm.types import GenerationRequest, ModelInfo, NetworkId, PeerId
from tests.ledger_kit import NETWORK, make_receipt, parties

PRICES = PriceTable(PriceSettings(initial_grant=1000.0))
MONTH_S = 30 * 86400
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    root = tmp_path_factory.mktemp("people")
    named = parties(root, "alice", "bob", "carol", "mallory", "trudy")
    # Parties whose certificates were issued a month ago: they may sign receipts of last week.
    for name in ("old-alice", "old-bob"):
        named[name] = load_or_create_identity(root / name, node_name=name, now=time.time() - MONTH_S)
    return named


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
def book(store: Store) -> CreditBook:
    return CreditBook(store.engine, PRICES, NETWORK)


async def _grants(book: CreditBook) -> int:
    """Micro-credits issued as grants, by the journal."""
    async with book._engine.connect() as connection:
        issued = await connection.scalar(
            text(
                "SELECT COALESCE(SUM(delta), 0) FROM credit_entries WHERE kind = 'grant' AND network_id = :n"
            ),
            {"n": NETWORK},
        )
    return int(issued or 0)


async def _conserved(book: CreditBook) -> dict[str, int]:
    """The balances, after checking none is negative, they sum to the grants and the audit agrees."""
    balances = await book.balances()
    assert all(balance >= 0 for balance in balances.values()), balances
    assert sum(balances.values()) == await _grants(book)
    report = await audit(book._engine, book.prices, NETWORK)
    assert report.ok, report.problems[:5]
    return balances


def _timed(
    consumer: NodeIdentity, seeder: NodeIdentity, request_id: str, finished_at_ms: int, *, tokens: int = 100
) -> Receipt:
    """A receipt both parties signed, finished at ``finished_at_ms``."""
    terms = draft_terms(
        PRICES,
        request_id=request_id,
        network_id=NETWORK,
        model=MODEL,
        tier="fast",
        prompt_tokens=40,
        completion_tokens=tokens,
        consumer=consumer.certificate,
        seeder=seeder.certificate,
        started_at_ms=finished_at_ms - 500,
        finished_at_ms=finished_at_ms,
    )
    encoded = terms.to_bytes()
    signature = consumer.sign(encoded)
    return Receipt(
        terms=encoded, consumer_signature=signature, seeder_signature=seeder.sign(encoded + signature)
    )


def _request_id(receipt: Receipt) -> str:
    return ReceiptTerms.from_bytes(receipt.terms).request_id


# -- 1. minting by collusion ---------------------------------------------------------------------


async def test_colluders_cannot_mint_credits_in_an_observer_book(book: CreditBook, people) -> None:
    alice, bob, mallory, trudy = (people[name] for name in ("alice", "bob", "mallory", "trudy"))
    await book.join(alice.account_id)
    await book.join(bob.account_id)
    # Two accounts with valid keys co-sign a receipt for 4,000,000 tokens the consumer never paid for.
    minted = make_receipt(PRICES, mallory, trudy, "mint", completion_tokens=4_000_000)
    price = PRICES.price(MODEL, "fast", 40, 4_000_000)
    assert await book.record_receipt(minted, observed=True)  # kept (parked) and passed on
    balances = await _conserved(book)
    assert balances.get(mallory.account_id, 0) == 0 and balances.get(trudy.account_id, 0) == 0
    assert not await book.is_settled("mint") and await book.parked() == ["mint"]
    assert not await book.record_receipt(minted, observed=True)  # heard again: nothing new

    # Honest receipts fund the consumer: the parked receipt applies once it is covered, and only then.
    half = make_receipt(PRICES, alice, mallory, "fund-1", completion_tokens=2_000_000)
    assert await book.record_receipt(half, observed=True)
    balances = await _conserved(book)
    assert balances.get(trudy.account_id, 0) == 0 and not await book.is_settled("mint")
    rest = make_receipt(PRICES, bob, mallory, "fund-2", completion_tokens=2_000_000)
    assert await book.record_receipt(rest, observed=True)
    balances = await _conserved(book)
    assert await book.is_settled("mint")
    earned = 2 * PRICES.price(MODEL, "fast", 40, 2_000_000)
    assert balances[mallory.account_id] == earned - price >= 0
    assert balances[trudy.account_id] == price
    # Replays of every receipt change nothing: the parked one applied exactly once.
    for receipt in (minted, half, rest):
        assert not await book.record_receipt(receipt, observed=True)
    assert await _conserved(book) == balances
    assert await book.parked() == []
    async with book._engine.connect() as connection:
        entries = await connection.scalar(
            text("SELECT COUNT(*) FROM credit_entries WHERE request_id = 'mint'")
        )
    assert entries == 2
    assert sum(balances.values()) == 2 * PRICES.initial_grant


async def test_fifty_concurrent_heard_receipts_never_overdraw_their_consumer(
    book: CreditBook, people
) -> None:
    carol, bob = people["carol"], people["bob"]
    small = CreditBook(book._engine, PriceTable(PriceSettings(initial_grant=1.0)), NETWORK)
    await small.join(carol.account_id)
    # Each costs 0.201 credits: carol's one credit pays for four of them.
    receipts = [
        make_receipt(PRICES, carol, bob, f"spend-{index}", completion_tokens=2000) for index in range(50)
    ]
    outcomes = await asyncio.gather(*(small.record_receipt(receipt, observed=True) for receipt in receipts))
    assert all(outcomes)
    balances = await _conserved(small)
    settled = [receipt for receipt in receipts if await small.is_settled(_request_id(receipt))]
    assert len(settled) == 4 and len(await small.parked()) == 46
    assert sum(balances.values()) == MICRO  # one grant, to carol; bob earned what she paid
    report = await audit(small._engine, small.prices, NETWORK)
    assert report.receipts == 4


async def test_the_audit_reports_credits_beyond_what_was_issued(book: CreditBook, people) -> None:
    alice, bob = people["alice"], people["bob"]
    await book.join(alice.account_id)
    await book.settle(make_receipt(PRICES, alice, bob, "a-1"))
    # What a ledger that let a consumer overdraw holds: a negative balance and spendable credits
    # beyond the grants, every balance consistent with its journal.
    async with book._engine.begin() as connection:
        for account, delta in ((alice.account_id, -3000 * MICRO), (bob.account_id, 3000 * MICRO)):
            await connection.execute(
                text("UPDATE credit_accounts SET balance = balance + :d WHERE account_id = :a"),
                {"d": delta, "a": account},
            )
            await connection.execute(
                text(
                    "UPDATE credit_entries SET delta = delta + :d WHERE account_id = :a AND request_id = 'a-1'"
                ),
                {"d": delta, "a": account},
            )
    report = await audit(book._engine, PRICES, NETWORK)
    assert not report.ok
    assert any("exceed" in problem and "issued" in problem for problem in report.problems), report.problems


# -- 2. grants only with a membership ----------------------------------------------------------


async def test_accounts_seen_only_in_heard_receipts_get_no_grant(
    book: CreditBook, people, tmp_path: Path
) -> None:
    alice = people["alice"]
    await book.join(alice.account_id)
    strangers = list(parties(tmp_path, *(f"s{index}" for index in range(100))).values())
    # Fifty strangers serve alice; fifty others ask the first ones for more than they hold (nothing).
    earned = [make_receipt(PRICES, alice, stranger, f"e-{i}") for i, stranger in enumerate(strangers[:50])]
    spent = [
        make_receipt(PRICES, stranger, strangers[i], f"p-{i}") for i, stranger in enumerate(strangers[50:])
    ]
    for receipt in [*earned, *spent]:
        assert await book.record_receipt(receipt, observed=True)
    balances = await _conserved(book)
    share = PRICES.price(MODEL, "fast", 40, 100)
    for stranger in strangers[:50]:
        assert balances[stranger.account_id] == share  # what it earned, no grant
    for stranger in strangers[50:]:
        assert balances.get(stranger.account_id, 0) == 0
    assert await _grants(book) == PRICES.initial_grant  # alice's, nobody else's
    assert len(await book.parked()) == 50


async def test_a_member_is_granted_once_however_often_it_joins(book: CreditBook, people) -> None:
    alice, dave = people["alice"], people["carol"]
    await book.join(alice.account_id)
    # First seen in a heard receipt: opened with what it earned, no grant.
    assert await book.record_receipt(make_receipt(PRICES, alice, dave, "d-1"), observed=True)
    share = PRICES.price(MODEL, "fast", 40, 100)
    assert (await book.balances())[dave.account_id] == share
    # Then its membership is proven: twenty concurrent joins grant it once.
    balances = await asyncio.gather(*(book.join(dave.account_id) for _ in range(20)))
    assert set(balances) == {PRICES.initial_grant + share}
    assert await _grants(book) == 2 * PRICES.initial_grant
    assert sum((await _conserved(book)).values()) == 2 * PRICES.initial_grant


# -- 3. admission pricing --------------------------------------------------------------------------


async def test_a_request_without_max_tokens_is_priced_at_the_cap(store: Store, people) -> None:
    alice, bob = people["alice"], people["bob"]
    # One credit per 1,000 tokens; the grant pays for a few dozen tokens, not the 4,096 of the cap.
    prices = PriceTable(PriceSettings(tier_prices={"tiny": 1.0}, initial_grant=0.05))
    network = NetworkId(NETWORK)
    model = ModelInfo(name="m", backend="llama_cpp", context_tokens=32768, tier="tiny")
    request = GenerationRequest(request_id="open", model="m", messages=({"role": "user", "content": "Hi"},))
    consumer = Settler(alice, prices, network, CreditBook(store.engine, prices, network))
    with pytest.raises(PaymentRequiredError, match="does not cover the price"):
        await consumer.admit(request, model, PeerId(bob.peer_id))
    admitted = await consumer.admit(request.model_copy(update={"max_tokens": 8}), model, PeerId(bob.peer_id))
    assert admitted.request.max_tokens == 8
    # The seeder prices an open request at the cap too, before any work: the hold for 8 tokens
    # does not cover it.
    seeder = Settler(bob, prices, network, CreditBook(store.engine, prices, network))
    with pytest.raises(PaymentRequiredError, match="may cost") as short:
        await seeder.check_consumer(
            alice.certificate, InferenceMessage(request=request, hold=admitted.hold.signed), model
        )
    assert short.value.code == "hold_short"
    served = InferenceMessage(request=admitted.request, hold=admitted.hold.signed)
    assert await seeder.check_consumer(alice.certificate, served, model) == admitted.hold.terms


# -- 4. receipt times ------------------------------------------------------------------------------


def test_a_receipt_outside_its_certificates_validity_is_refused(people) -> None:
    alice, bob = people["alice"], people["bob"]
    after = _timed(alice, bob, "late", (alice.certificate.expires_at + 10) * 1000)
    before = _timed(alice, bob, "early", (alice.certificate.issued_at - 3600) * 1000)
    for receipt in (after, before):
        with pytest.raises(ReceiptError) as refused:
            check_receipt(receipt, PRICES)
        assert refused.value.code == "receipt_certificate_invalid", refused.value.message


async def test_a_receipt_too_far_from_now_is_refused(book: CreditBook, people) -> None:
    alice, bob, old_alice, old_bob = (people[name] for name in ("alice", "bob", "old-alice", "old-bob"))
    await book.join(alice.account_id)
    await book.join(old_alice.account_id)
    now_ms = int(time.time() * 1000)
    future = _timed(alice, bob, "future", now_ms + 11 * 60 * 1000)
    for observed in (False, True):
        with pytest.raises(ReceiptError) as refused:
            await book.settle(future, observed=observed)
        assert refused.value.code == "receipt_future", refused.value.message
    stale = _timed(old_alice, old_bob, "stale", now_ms - 8 * 86400 * 1000)
    with pytest.raises(ReceiptError) as refused:
        await book.settle(stale, observed=True)
    assert refused.value.code == "receipt_stale", refused.value.message
    assert not await book.is_settled("future") and not await book.is_settled("stale")
    assert await book.parked() == []
    # Within the window both are fine: a little ahead of this clock, a heard receipt of six days ago.
    assert await book.record_receipt(_timed(alice, bob, "soon", now_ms + 60 * 1000))
    assert await book.record_receipt(
        _timed(old_alice, old_bob, "week", now_ms - 6 * 86400 * 1000), observed=True
    )
    await _conserved(book)
