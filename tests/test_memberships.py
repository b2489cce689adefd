"""The authority's membership books on SQLite and PostgreSQL: exact invite uses, replays, refusals that
change nothing, the public-network join limits under concurrency, and restarts."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from mycellm.errors import MembershipError
from mycellm.ledger.memberships import JoinRateLimitedError, Membership, MembershipBook
from mycellm.ledger.store import Store

NETWORK = "net-federated"
NOW = 1_750_000_000.0
TABLES = ("invites", "invite_redemptions", "memberships", "join_attempts")


def nonce(number: int) -> bytes:
    return number.to_bytes(16, "big")


def account(number: int) -> str:
    return hashlib.sha256(f"account-{number}".encode()).hexdigest()


def issuer(label: str, expires_at: float = NOW + 86400) -> Any:
    return lambda: (f"certificate of {label}".encode(), expires_at)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
def book(store: Store) -> MembershipBook:
    return MembershipBook(store.engine)


async def counts(store: Store) -> dict[str, Any]:
    """Rows of every table of the books, and the uses of every invite."""
    async with store.engine.connect() as connection:
        found: dict[str, Any] = {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in TABLES
        }
        rows = await connection.execute(text("SELECT nonce, uses, revoked FROM invites ORDER BY nonce"))
        found["uses"] = [(bytes(row[0]), row[1], bool(row[2])) for row in rows]
    return found


async def redeem(book: MembershipBook, number: int, invite: int = 1, now: float = NOW) -> Membership:
    return await book.redeem(NETWORK, nonce(invite), account(number), now, issuer(f"a{number}"))


async def test_a_redemption_makes_a_member_and_uses_one_use(book: MembershipBook, store: Store) -> None:
    assert await book.record_invite(NETWORK, nonce(1), "member", 3, NOW + 60, now=NOW)
    assert not await book.record_invite(NETWORK, nonce(1), "member", 3, NOW + 60)  # the same terms again
    membership = await book.redeem(NETWORK, nonce(1), account(1), NOW, issuer("a1"), source="10.0.0.1")
    assert membership == Membership(
        network_id=NETWORK,
        account_id=account(1),
        role="member",
        issued_at=NOW,
        expires_at=NOW + 86400,
        certificate=b"certificate of a1",
        source="10.0.0.1",
    )
    assert await book.membership(NETWORK, account(1)) == membership
    assert await book.members(NETWORK) == [membership]
    invite = await book.invite(NETWORK, nonce(1))
    assert invite is not None and invite.uses == 1 and invite.max_uses == 3
    assert (await counts(store))["invite_redemptions"] == 1
    with pytest.raises(MembershipError) as conflict:
        await book.record_invite(NETWORK, nonce(1), "admin", 3, NOW + 60)
    assert conflict.value.code == "invite_conflict"


async def test_a_hundred_concurrent_redemptions_of_seven_uses_make_seven_members(
    book: MembershipBook, store: Store
) -> None:
    await book.record_invite(NETWORK, nonce(1), "member", 7, NOW + 60)
    outcomes = await asyncio.gather(*(redeem(book, number) for number in range(100)), return_exceptions=True)
    admitted = [outcome for outcome in outcomes if isinstance(outcome, Membership)]
    refused = [outcome for outcome in outcomes if not isinstance(outcome, Membership)]
    assert len(admitted) == 7
    assert all(isinstance(error, MembershipError) and error.code == "invite_used_up" for error in refused), (
        refused[:3]
    )
    state = await counts(store)
    assert state["memberships"] == state["invite_redemptions"] == 7
    assert state["uses"] == [(nonce(1), 7, False)]
    assert {member.account_id for member in await book.members(NETWORK)} == {m.account_id for m in admitted}


async def test_a_replayed_redemption_returns_the_membership_and_uses_nothing(
    book: MembershipBook, store: Store
) -> None:
    await book.record_invite(NETWORK, nonce(1), "member", 5, NOW + 60)
    first = await redeem(book, 1)
    # The same account again, later and concurrently: its membership, no second use.
    again = await asyncio.gather(*(redeem(book, 1, now=NOW + 1) for _ in range(20)))
    assert all(membership == first for membership in again)
    # Even once the invite expired or was revoked, the replay is recognised.
    assert await redeem(book, 1, now=NOW + 3600) == first
    assert await book.revoke_invite(NETWORK, nonce(1))
    assert await redeem(book, 1) == first
    # A member whose certificate is valid keeps it when it redeems another invite: that use stays.
    await book.record_invite(NETWORK, nonce(2), "admin", 5, NOW + 60)
    assert await redeem(book, 1, invite=2) == first
    state = await counts(store)
    assert state["uses"] == [(nonce(1), 1, True), (nonce(2), 0, False)]
    assert state["invite_redemptions"] == state["memberships"] == 1


async def refused(book: MembershipBook, store: Store, code: str, *arguments: Any) -> None:
    before = await counts(store)
    with pytest.raises(MembershipError) as caught:
        await book.redeem(*arguments)
    assert caught.value.code == code and caught.value.status == 403, caught.value.message
    assert await counts(store) == before


async def test_every_refused_redemption_changes_nothing(book: MembershipBook, store: Store) -> None:
    bound_key = b"k" * 32
    await book.record_invite(NETWORK, nonce(1), "member", 1, NOW + 60)
    await book.record_invite(NETWORK, nonce(2), "member", 5, NOW - 1)  # already expired
    await book.record_invite(NETWORK, nonce(3), "member", 5, NOW + 60)
    await book.record_invite(NETWORK, nonce(4), "member", 5, NOW + 60, bound_key)
    await book.revoke_invite(NETWORK, nonce(3))
    assert not await book.revoke_invite(NETWORK, nonce(3))
    await redeem(book, 1)
    await refused(book, store, "invite_used_up", NETWORK, nonce(1), account(2), NOW, issuer("a2"))
    await refused(book, store, "invite_expired", NETWORK, nonce(2), account(2), NOW, issuer("a2"))
    await refused(book, store, "invite_expired", NETWORK, nonce(1), account(2), NOW + 60, issuer("a2"))
    await refused(book, store, "invite_revoked", NETWORK, nonce(3), account(2), NOW, issuer("a2"))
    await refused(book, store, "invite_unknown", NETWORK, nonce(9), account(2), NOW, issuer("a2"))
    await refused(book, store, "invite_unknown", "other-network", nonce(1), account(2), NOW, issuer("a2"))
    await refused(book, store, "invite_bound", NETWORK, nonce(4), account(2), NOW, issuer("a2"))
    bound_account = hashlib.sha256(bound_key).hexdigest()
    assert (await book.redeem(NETWORK, nonce(4), bound_account, NOW, issuer("b"))).account_id == bound_account

    def failing() -> tuple[bytes, float]:
        raise RuntimeError("the signer is gone")

    await book.record_invite(NETWORK, nonce(7), "member", 5, NOW + 60)
    before = await counts(store)
    with pytest.raises(RuntimeError):
        await book.redeem(NETWORK, nonce(7), account(3), NOW, failing)
    assert await counts(store) == before
    # A revoked member is not readmitted, neither by a replay nor by a new invite.
    await book.revoke_member(NETWORK, account(1), NOW + 5)
    await book.record_invite(NETWORK, nonce(5), "member", 5, NOW + 60)
    await refused(book, store, "membership_revoked", NETWORK, nonce(1), account(1), NOW, issuer("a1"))
    await refused(book, store, "membership_revoked", NETWORK, nonce(5), account(1), NOW, issuer("a1"))
    with pytest.raises(MembershipError, match="16-byte nonce"):
        await book.record_invite(NETWORK, b"short", "member", 1, NOW + 60)
    with pytest.raises(MembershipError, match="max_uses 0"):
        await book.record_invite(NETWORK, nonce(6), "member", 0, NOW + 60)


async def test_revoke_and_renew(book: MembershipBook, store: Store) -> None:
    await book.record_invite(NETWORK, nonce(1), "member", 5, NOW + 60)
    await redeem(book, 1)
    await redeem(book, 2)
    renewed = await book.renew(NETWORK, account(1), NOW + 10, issuer("a1 again", NOW + 99), role="admin")
    assert (renewed.certificate, renewed.issued_at, renewed.expires_at, renewed.role) == (
        b"certificate of a1 again",
        NOW + 10,
        NOW + 99,
        "admin",
    )
    revoked = await book.revoke_member(NETWORK, account(2), NOW + 20)
    assert revoked.revoked_at == NOW + 20
    assert (await book.revoke_member(NETWORK, account(2), NOW + 30)).revoked_at == NOW + 20  # the first stays
    assert [member.account_id for member in await book.members(NETWORK)] == [account(1)]
    assert len(await book.members(NETWORK, include_revoked=True)) == 2
    before = await counts(store)
    for call, code in [
        (book.renew(NETWORK, account(2), NOW, issuer("x")), "membership_revoked"),
        (book.renew(NETWORK, account(7), NOW, issuer("x")), "membership_unknown"),
        (book.revoke_member(NETWORK, account(7), NOW), "membership_unknown"),
    ]:
        with pytest.raises(MembershipError) as caught:
            await call
        assert caught.value.code == code
    assert await counts(store) == before
    # A member whose certificate expired is renewed by a new invite (and that uses a use).
    await book.record_invite(NETWORK, nonce(2), "member", 5, NOW + 10_000)
    again = await book.redeem(NETWORK, nonce(2), account(1), NOW + 200, issuer("a1 third"))
    assert again.certificate == b"certificate of a1 third" and again.issued_at == NOW + 200
    assert (await counts(store))["uses"][1] == (nonce(2), 1, False)


async def join(
    book: MembershipBook, number: int, now: float = NOW, source: str = "203.0.113.7", **limits: int
) -> Any:
    per_hour, per_day = limits.get("per_hour", 5), limits.get("per_day", 20)
    return await book.admit_public(
        NETWORK, account(number), source, now, per_hour, per_day, issuer(f"p{number}")
    )


async def test_fifty_concurrent_joins_from_one_source_admit_exactly_the_hourly_limit(
    book: MembershipBook, store: Store
) -> None:
    outcomes = await asyncio.gather(*(join(book, number) for number in range(50)), return_exceptions=True)
    admitted = [outcome for outcome in outcomes if isinstance(outcome, Membership)]
    refused = [outcome for outcome in outcomes if not isinstance(outcome, Membership)]
    assert len(admitted) == 5
    assert all(isinstance(error, JoinRateLimitedError) for error in refused), refused[:3]
    assert {(error.status, error.code) for error in refused} == {(429, "join_rate_limited")}
    state = await counts(store)
    assert state["memberships"] == state["join_attempts"] == 5
    # Another source is not held back by this one; a member joining again counts nothing.
    assert (await join(book, 100, source="198.51.100.1")).source == "198.51.100.1"
    assert await join(book, 100, source="198.51.100.1") == await book.membership(NETWORK, account(100))
    # An hour later the source has its next five.
    later = await asyncio.gather(
        *(join(book, 200 + n, now=NOW + 3601) for n in range(20)), return_exceptions=True
    )
    assert sum(isinstance(outcome, Membership) for outcome in later) == 5
    assert (await counts(store))["join_attempts"] == 11


async def test_a_thousand_fresh_accounts_from_one_source_get_only_the_daily_limit(
    book: MembershipBook, store: Store
) -> None:
    admitted = 0
    for batch in range(10):  # a thousand joins spread over a day, a hundred at a time
        now = NOW + batch * 8640
        outcomes = await asyncio.gather(
            *(join(book, batch * 100 + n, now=now, per_hour=4, per_day=12) for n in range(100)),
            return_exceptions=True,
        )
        assert all(isinstance(o, Membership | JoinRateLimitedError) for o in outcomes), outcomes[:3]
        admitted += sum(isinstance(outcome, Membership) for outcome in outcomes)
    assert admitted == 12
    assert (await counts(store))["memberships"] == 12
    # A day after the first joins, the oldest stop counting (and are pruned).
    assert isinstance(await join(book, 5000, now=NOW + 86400 + 1, per_hour=4, per_day=12), Membership)
    assert (await counts(store))["join_attempts"] <= 12


async def test_a_second_book_on_the_same_database_continues_the_counts(database_url: str) -> None:
    first = await Store.open(database_url)
    book = MembershipBook(first.engine)
    await book.record_invite(NETWORK, nonce(1), "member", 3, NOW + 60)
    await redeem(book, 1)
    await redeem(book, 2)
    for number in range(3):
        await join(book, 100 + number, per_hour=3)
    await first.close()
    second = await Store.open(database_url)
    try:
        book = MembershipBook(second.engine)
        await redeem(book, 3)
        with pytest.raises(MembershipError, match="used 3 times"):
            await redeem(book, 4)
        assert await redeem(book, 1) == await book.membership(NETWORK, account(1))
        with pytest.raises(JoinRateLimitedError):
            await join(book, 200, per_hour=3)
        assert len(await book.members(NETWORK)) == 6
    finally:
        await second.close()


REDEEMER = """
import asyncio, hashlib, sys
from mycellm.ledger.memberships import MembershipBook
from mycellm.ledger.store import Store

async def main(url, first, last):
    store = await Store.open(url)
    book = MembershipBook(store.engine)
    for number in range(int(first), int(last)):
        account = hashlib.sha256(f"account-{number}".encode()).hexdigest()
        try:
            await book.redeem("net-federated", (1).to_bytes(16, "big"), account, 1_750_000_000.0,
                              lambda: (b"c", 1_750_086_400.0))
            print("admitted", flush=True)
        except Exception as error:
            print(getattr(error, "code", repr(error)), flush=True)
    await store.close()

asyncio.run(main(*sys.argv[1:]))
"""


def run_redeemer(url: str, first: int, last: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", REDEEMER, url, str(first), str(last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.split()


async def test_the_counts_survive_a_process_restart(database_url: str) -> None:
    store = await Store.open(database_url)
    try:
        await MembershipBook(store.engine).record_invite(NETWORK, nonce(1), "member", 5, NOW + 60)
    finally:
        await store.close()
    assert await asyncio.to_thread(run_redeemer, database_url, 0, 3) == ["admitted"] * 3
    # A second process, and two at once: the invite's last two uses go, not one more.
    outcomes = await asyncio.gather(
        asyncio.to_thread(run_redeemer, database_url, 3, 6),
        asyncio.to_thread(run_redeemer, database_url, 6, 9),
    )
    results = [result for outcome in outcomes for result in outcome]
    assert sorted(results) == ["admitted"] * 2 + ["invite_used_up"] * 4
    store = await Store.open(database_url)
    try:
        assert (await counts(store))["memberships"] == 5
    finally:
        await store.close()
