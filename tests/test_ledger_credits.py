"""The credit ledger on SQLite and PostgreSQL: zero-sum settlement, every refusal, audit, conservation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from mycellm.config import PriceSettings
from mycellm.errors import PaymentRequiredError, ReceiptError
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms, check_receipt, countersign, draft_terms
from mycellm.ledger.records import ServedRequestRecord
from mycellm.ledger.store import Store
from mycellm.network.settlement import CreditKeeper
from tests.ledger_kit import NETWORK, make_receipt, parties

PRICES = PriceTable(PriceSettings(initial_grant=1.0))
EXAMPLES = itertools.count()


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    return parties(tmp_path_factory.mktemp("people"), "alice", "bob", "relay", "carol")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


async def _members(book: CreditBook, people: dict[str, NodeIdentity]) -> CreditBook:
    """``book`` with every party a proven member (granted once): accounts only seen in receipts get nothing."""
    for identity in people.values():
        await book.join(identity.account_id)
    return book


@pytest.fixture
async def book(store: Store, people: dict[str, NodeIdentity]) -> CreditBook:
    return await _members(CreditBook(store.engine, PRICES, NETWORK), people)


async def _balances(book: CreditBook) -> dict[str, int]:
    return await book.balances()


async def test_a_receipt_moves_credits_zero_sum_with_the_relay_fee(book: CreditBook, people) -> None:
    alice, bob, relay = people["alice"], people["bob"], people["relay"]
    receipt = make_receipt(
        PRICES, alice, bob, "r-1", relays=(relay,), prompt_tokens=400, completion_tokens=1000
    )
    settlement = await book.settle(receipt)
    grant = PRICES.initial_grant
    price = PRICES.price("SmolLM2-135M-Instruct", "fast", 400, 1000)
    assert price == settlement.price == round(0.1 * MICRO * 1.1)  # 1000 + 0.25 * 400 tokens at 0.1/1k
    fee = int(price * 0.1)
    assert await _balances(book) == {
        alice.account_id: grant - price,
        bob.account_id: grant + price - fee,
        relay.account_id: grant + fee,
        people["carol"].account_id: grant,  # a member not party to the receipt
    }
    report = await audit(book._engine, PRICES, NETWORK)
    assert report.ok, report.problems
    assert report.issued == report.total_balance == 4 * grant and report.receipts == 1


async def _refused(book: CreditBook, receipt: Receipt, code: str, **options: bool) -> None:
    """``receipt`` is refused with ``code`` and no balance moves."""
    before = await _balances(book)
    with pytest.raises(ReceiptError) as caught:
        await book.settle(receipt, **options)
    assert caught.value.code == code, caught.value.message
    assert await _balances(book) == before


async def test_refusals_change_nothing(book: CreditBook, people) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    first = make_receipt(PRICES, alice, bob, "r-1")
    await book.settle(first)
    await _refused(book, first, "receipt_replayed")
    await _refused(book, make_receipt(PRICES, alice, bob, "r-1", completion_tokens=7), "receipt_conflict")

    # A tampered field: the signatures no longer cover the terms.
    terms = ReceiptTerms.from_bytes(first.terms).model_copy(
        update={"request_id": "r-2", "completion_tokens": 1}
    )
    tampered = first.model_copy(update={"terms": terms.to_bytes()})
    await _refused(book, tampered, "receipt_forged")

    await _refused(book, make_receipt(PRICES, alice, bob, "r-5", network_id="elsewhere"), "receipt_invalid")
    await _refused(book, make_receipt(PRICES, alice, alice, "r-6"), "receipt_invalid")  # paying itself
    # The seeder's own ledger: a receipt for a request this node did not serve.
    await _refused(book, make_receipt(PRICES, carol, bob, "r-7"), "receipt_unjustified", served_here=True)
    assert not await book.is_settled("r-7")
    report = await audit(book._engine, PRICES, NETWORK)
    assert report.ok and report.receipts == 1


async def test_wrong_signers_and_wrong_prices_change_nothing(book: CreditBook, people) -> None:
    alice, bob = people["alice"], people["bob"]
    await book.settle(make_receipt(PRICES, alice, bob, "r-1"))
    # Signed by a key that is not the consumer's device key (the account key, here).
    draft = draft_terms(
        PRICES,
        request_id="r-3",
        network_id=NETWORK,
        model="m",
        tier="fast",
        prompt_tokens=1,
        completion_tokens=1,
        consumer=alice.certificate,
        seeder=bob.certificate,
        started_at_ms=0,
    )
    encoded = draft.to_bytes()
    assert alice.account_key is not None
    forged = Receipt(
        terms=encoded,
        consumer_signature=alice.account_key.sign(encoded),
        seeder_signature=bob.sign(encoded + alice.account_key.sign(encoded)),
    )
    await _refused(book, forged, "receipt_forged")
    with pytest.raises(ReceiptError, match="consumer signature"):
        countersign(encoded, Ed25519PrivateKey.generate().sign(encoded), bob)

    # Amounts that do not follow the price table, even when both parties signed them.
    cheap = draft.model_copy(update={"request_id": "r-4", "price": 1, "seeder_share": 1})
    encoded = cheap.to_bytes()
    signature = alice.sign(encoded)
    await _refused(
        book,
        Receipt(terms=encoded, consumer_signature=signature, seeder_signature=bob.sign(encoded + signature)),
        "receipt_mispriced",
    )
    report = await audit(book._engine, PRICES, NETWORK)
    assert report.ok and report.receipts == 1


async def test_the_book_is_the_keeper_of_settlement_and_a_replay_is_no_error_there(
    book: CreditBook, people
) -> None:
    alice, bob = people["alice"], people["bob"]
    assert isinstance(book, CreditKeeper)
    receipt = make_receipt(PRICES, alice, bob, "k-1")
    assert await book.record_receipt(receipt)
    before = await _balances(book)
    assert not await book.record_receipt(receipt)  # a retried exchange, or gossip heard twice
    assert not await book.record_receipt(receipt, observed=True)
    assert await _balances(book) == before
    # Every other refusal is still an error, and changes nothing.
    with pytest.raises(ReceiptError) as conflict:
        await book.record_receipt(make_receipt(PRICES, alice, bob, "k-1", completion_tokens=7))
    assert conflict.value.code == "receipt_conflict"
    with pytest.raises(PaymentRequiredError):
        await book.record_receipt(make_receipt(PRICES, alice, bob, "k-2", completion_tokens=50_000))
    assert await _balances(book) == before


async def test_the_seeder_settles_only_what_it_served(book: CreditBook, store: Store, people) -> None:
    alice, bob = people["alice"], people["bob"]
    await store.record_request(
        ServedRequestRecord(
            request_id="served-1",
            model="SmolLM2-135M-Instruct",
            endpoint="chat",
            route_kind="local",
            route_target="worker-0",
            prompt_tokens=40,
            completion_tokens=100,
            duration_ms=5.0,
            outcome="ok",
            created_at=datetime.now(UTC),
        )
    )
    with pytest.raises(ReceiptError, match="this node served") as mismatch:
        await book.settle(
            make_receipt(PRICES, alice, bob, "served-1", completion_tokens=101), served_here=True
        )
    assert mismatch.value.code == "receipt_unjustified"
    await book.settle(make_receipt(PRICES, alice, bob, "served-1"), served_here=True)
    assert await book.is_settled("served-1")


async def test_a_consumer_that_cannot_pay_gets_402_and_nothing_changes(book: CreditBook, people) -> None:
    alice, bob = people["alice"], people["bob"]
    huge = make_receipt(PRICES, alice, bob, "big", completion_tokens=20_000)  # 2 credits > 1 granted
    with pytest.raises(PaymentRequiredError) as caught:
        await book.settle(huge)
    assert caught.value.status == 402 and "does not cover the price 2.001000 credits" in caught.value.message
    assert not await book.is_settled("big")
    with pytest.raises(PaymentRequiredError, match=r"balance 1\.000000 credits"):
        await book.require_funds(alice.account_id, 2 * MICRO)
    assert (await audit(book._engine, PRICES, NETWORK)).ok


async def test_hundreds_of_concurrent_settlements_conserve_credits(book: CreditBook, people) -> None:
    names = ["alice", "bob", "relay", "carol"]
    receipts = [
        make_receipt(
            PRICES,
            people[names[index % 4]],
            people[names[(index + 1) % 4]],
            f"c-{index}",
            relays=(people[names[(index + 2) % 4]],) if index % 3 == 0 else (),
            completion_tokens=50 + index % 17,
        )
        for index in range(300)
    ]
    outcomes = await asyncio.gather(*(book.settle(receipt) for receipt in receipts), return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(isinstance(failure, PaymentRequiredError) for failure in failures), failures[:3]
    report = await audit(book._engine, PRICES, NETWORK)
    assert report.ok, report.problems[:5]
    assert (
        report.receipts == 300 - len(failures)
        and report.total_balance == report.issued == 4 * PRICES.initial_grant
    )


async def test_audit_finds_a_balance_or_receipt_changed_behind_the_ledger(book: CreditBook, people) -> None:
    alice, bob = people["alice"], people["bob"]
    await book.settle(make_receipt(PRICES, alice, bob, "a-1"))
    async with book._engine.begin() as connection:
        await connection.execute(
            text("UPDATE credit_accounts SET balance = balance + 5 WHERE account_id = :account"),
            {"account": bob.account_id},
        )
    report = await audit(book._engine, PRICES, NETWORK)
    assert not report.ok
    assert any("balance" in problem and bob.account_id[:12] in problem for problem in report.problems)
    assert any("was issued" in problem for problem in report.problems)


def test_check_receipt_refuses_an_expired_party(people, tmp_path: Path) -> None:
    alice, bob = people["alice"], people["bob"]
    receipt = make_receipt(PRICES, alice, bob, "old")
    terms = ReceiptTerms.from_bytes(receipt.terms)
    late = terms.model_copy(update={"finished_at_ms": (alice.certificate.expires_at + 10) * 1000})
    encoded = late.to_bytes()
    signature = alice.sign(encoded)
    with pytest.raises(ReceiptError, match="expired"):
        check_receipt(
            Receipt(
                terms=encoded, consumer_signature=signature, seeder_signature=bob.sign(encoded + signature)
            ),
            PRICES,
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3), st.integers(0, 3), st.booleans(), st.integers(0, 3000), st.integers(0, 6000)
        ),
        min_size=1,
        max_size=25,
    )
)
async def test_any_sequence_of_requests_keeps_the_books_balanced(store: Store, people, sequence) -> None:
    names = ["alice", "bob", "relay", "carol"]
    network = f"net-{next(EXAMPLES)}"
    book = await _members(CreditBook(store.engine, PRICES, network), people)
    for index, (consumer, seeder, relayed, prompt, completion) in enumerate(sequence):
        if consumer == seeder:
            continue
        third = next(name for name in names if name not in (names[consumer], names[seeder]))
        relay = (people[third],) if relayed else ()
        receipt = make_receipt(
            PRICES,
            people[names[consumer]],
            people[names[seeder]],
            f"h-{index}",
            relays=relay,
            prompt_tokens=prompt,
            completion_tokens=completion,
            network_id=network,
        )
        with contextlib.suppress(PaymentRequiredError):
            await book.settle(receipt)
    report = await audit(store.engine, PRICES, network)
    assert report.ok, report.problems[:5]
    assert sum((await book.balances()).values()) == report.issued


SETTLER = """
import asyncio, sys, cbor2
from mycellm.ledger.credits import CreditBook
from mycellm.config import PriceSettings
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.receipts import Receipt
from mycellm.ledger.store import Store

async def main(url, path):
    store = await Store.open(url)
    book = CreditBook(store.engine, PriceTable(PriceSettings(initial_grant=1000.0)), sys.argv[3])
    for encoded in cbor2.loads(open(path, "rb").read()):
        await book.settle(Receipt.from_bytes(encoded))
        print("settled", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _settle_then_die(url: str, batch: Path, network: str, settled: int) -> None:
    """Settle the batch in another process and SIGKILL it after ``settled`` receipts."""
    settler = subprocess.Popen(
        [sys.executable, "-c", SETTLER, url, str(batch), network], stdout=subprocess.PIPE, text=True
    )
    assert settler.stdout is not None
    for _ in range(settled):
        settler.stdout.readline()
    settler.kill()
    settler.wait(timeout=30)


async def test_a_ledger_killed_while_settling_is_whole_and_settles_the_rest_on_retry(
    database_url: str, people, tmp_path: Path
) -> None:
    import cbor2

    prices = PriceTable(PriceSettings(initial_grant=1000.0))
    names = ["alice", "bob", "relay", "carol"]
    receipts = [
        make_receipt(
            prices, people[names[i % 4]], people[names[(i + 1) % 4]], f"k-{i}", network_id="kill-net"
        )
        for i in range(400)
    ]
    batch = tmp_path / "receipts.cbor"
    batch.write_bytes(cbor2.dumps([receipt.to_bytes() for receipt in receipts]))
    opened = await Store.open(database_url)  # schema and members first, so the kill lands in settling
    await _members(CreditBook(opened.engine, prices, "kill-net"), people)
    await opened.close()
    await asyncio.to_thread(_settle_then_die, database_url, batch, "kill-net", 60)

    store = await Store.open(database_url)
    try:
        book = CreditBook(store.engine, prices, "kill-net")
        report = await audit(store.engine, prices, "kill-net")
        assert report.ok, report.problems[:5]
        assert 60 <= report.receipts < 400
        retried = 0
        for receipt in receipts:
            try:
                await book.settle(receipt)
                retried += 1
            except ReceiptError as error:
                assert error.code == "receipt_replayed"
        assert retried == 400 - report.receipts
        final = await audit(store.engine, prices, "kill-net")
        assert final.ok and final.receipts == 400
    finally:
        await store.close()


async def test_a_batch_settles_the_good_receipts_and_refuses_the_rest_alone(book: CreditBook, people) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    good = [make_receipt(PRICES, alice, bob, f"b-{index}") for index in range(5)]
    outcomes = await book.settle_many(
        [
            good[0],
            make_receipt(PRICES, carol, bob, "b-poor", completion_tokens=50_000),  # more than carol has
            good[1],
            good[1],  # the same receipt twice in one batch
            make_receipt(PRICES, alice, bob, "b-0", completion_tokens=3),  # conflicts with good[0]
            *good[2:],
        ]
    )
    codes = [getattr(outcome, "code", "ok") for outcome in outcomes]
    assert codes == [
        "ok",
        "insufficient_credits",
        "ok",
        "receipt_replayed",
        "receipt_conflict",
        "ok",
        "ok",
        "ok",
    ]
    report = await audit(book._engine, PRICES, NETWORK)
    assert report.ok and report.receipts == 5
