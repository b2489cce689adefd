"""A hold is checked and kept in one transaction on each side, and a refused one leaves no trace
that could later be billed or counted.

The seeder notes the releases shown and the hold, reads the consumer's chain and balance, and keeps
what it is about to serve only if the hold may be served; the consumer records its own hold only if
its balance less its open holds pays it. Real SQLite, real signatures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mycellm.config import PriceSettings
from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable
from mycellm.ledger.served import ServedRecord
from mycellm.ledger.spends import sign_spend
from mycellm.ledger.store import Store
from mycellm.types import AccountId, NetworkId, RequestId

NETWORK = NetworkId("n-holds")
PRICES = PriceTable(PriceSettings(tier_prices={"tiny": 1000.0}, initial_grant=60.0))
PRICE = 40 * MICRO  # what one request may cost: one fits the grant of 60 credits, two do not


@pytest.fixture
async def book(tmp_path: Path) -> AsyncIterator[CreditBook]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    yield CreditBook(store.engine, PRICES, NETWORK)
    await store.close()


@pytest.fixture
def alice(tmp_path: Path) -> NodeIdentity:
    return load_or_create_identity(tmp_path / "alice", node_name="alice")


@pytest.fixture
def bob(tmp_path: Path) -> NodeIdentity:
    return load_or_create_identity(tmp_path / "bob", node_name="bob")


def _hold(
    consumer: NodeIdentity,
    seeder: NodeIdentity,
    seq: int,
    held_before: int,
    price: int,
    kind: str = "hold",
    request_id: str | None = None,
) -> bytes:
    return sign_spend(
        consumer,
        kind,  # type: ignore[arg-type]
        network_id=NETWORK,
        request_id=request_id or f"r-{seq}",
        seeder_peer_id=seeder.peer_id,
        seq=seq,
        held_before=held_before,
        max_price=price,
    )


def _served(consumer: NodeIdentity, seq: int, held_before: int, price: int) -> ServedRecord:
    return ServedRecord(
        f"r-{seq}",
        consumer.peer_id,
        consumer.certificate.to_bytes(),
        "m",
        "tiny",
        40,
        (seq, held_before, price),
    )


async def test_the_seeder_keeps_what_it_serves_only_for_a_hold_it_admits(
    book: CreditBook, alice: NodeIdentity, bob: NodeIdentity
) -> None:
    account = AccountId(alice.account_id)
    await book.join(account)
    first = await book.check_hold(
        account, [_hold(alice, bob, 1, 0, PRICE)], PRICE, _served(alice, 1, 0, PRICE)
    )
    assert first.admitted and first.available == 60 * MICRO and not first.frauds
    assert await book.served_record(RequestId("r-1")) == _served(alice, 1, 0, PRICE)
    # The second hold states the first one honestly: 40 of 60 credits are still out, so 40 more do not fit.
    second = await book.check_hold(
        account, [_hold(alice, bob, 2, PRICE, PRICE)], PRICE, _served(alice, 2, PRICE, PRICE)
    )
    assert not second.admitted and second.view.outstanding == PRICE and second.available == 20 * MICRO
    assert await book.served_record(RequestId("r-2")) is None
    # A hold that covers less than the request may cost is refused the same way, and still noted:
    # what a consumer signed is evidence, served or not.
    short = await book.check_hold(
        account, [_hold(alice, bob, 3, 2 * PRICE, MICRO)], PRICE, _served(alice, 3, 2 * PRICE, MICRO)
    )
    assert not short.admitted
    assert await book.served_record(RequestId("r-3")) is None
    assert await book.spend_head(account) == (4, 2 * PRICE + MICRO)


async def test_a_release_shown_with_the_hold_frees_what_it_held(
    book: CreditBook, alice: NodeIdentity, bob: NodeIdentity
) -> None:
    account = AccountId(alice.account_id)
    await book.join(account)
    await book.check_hold(account, [_hold(alice, bob, 1, 0, PRICE)], PRICE, _served(alice, 1, 0, PRICE))
    release = _hold(alice, bob, 1, 0, PRICE, kind="release")
    second = await book.check_hold(
        account, [release, _hold(alice, bob, 2, PRICE, PRICE)], PRICE, _served(alice, 2, PRICE, PRICE)
    )
    assert second.admitted and second.view.outstanding == 0


async def test_two_holds_under_one_number_are_proven_in_the_check_and_not_served(
    book: CreditBook, alice: NodeIdentity, bob: NodeIdentity
) -> None:
    account = AccountId(alice.account_id)
    await book.join(account)
    await book.check_hold(account, [_hold(alice, bob, 1, 0, MICRO)], MICRO, _served(alice, 1, 0, MICRO))
    lie = _hold(alice, bob, 1, 0, MICRO, request_id="r-other")
    served = ServedRecord(
        "r-other", alice.peer_id, alice.certificate.to_bytes(), "m", "tiny", 1, (1, 0, MICRO)
    )
    check = await book.check_hold(account, [lie], MICRO, served)
    assert check.frauds == (alice.account_id,) and len(check.proofs) == 1 and not check.admitted
    assert await book.served_record(RequestId("r-other")) is None
    assert await book.take_proofs() == []  # handed out with the check, once


async def test_the_consumer_records_a_hold_only_if_its_balance_pays_it(
    book: CreditBook, alice: NodeIdentity, bob: NodeIdentity
) -> None:
    account = AccountId(alice.account_id)
    await book.join(account)
    assert await book.record_hold(_hold(alice, bob, 1, 0, PRICE), open_total=0) == 20 * MICRO
    # With the first still open, a second of 40 credits does not fit: refused, nothing recorded.
    assert await book.record_hold(_hold(alice, bob, 2, PRICE, PRICE), open_total=PRICE) == -20 * MICRO
    assert await book.spend_head(account) == (2, PRICE)
    assert await book.open_holds(account) == [(1, "r-1", PRICE)]
