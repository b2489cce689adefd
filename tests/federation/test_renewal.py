"""Membership renewal over QUIC: a member renews before expiry and keeps its links; revoked, lapsed and
forged requests are refused and change nothing; failed requests back off."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from mycellm.errors import FederationError, MembershipError, PeerError
from mycellm.federation.authority import HostedNetwork, next_description, revoke_member
from mycellm.federation.descriptions import NetworkDescription, issue_network_description
from mycellm.federation.held import MEMBERSHIP_FILE, MEMBERSHIPS_DIR, HeldNetwork, renewal_due
from mycellm.federation.memberships import MembershipCertificate, issue_membership
from mycellm.identity.keys import load_or_create_identity
from mycellm.network.codec import FrameReader, encode_frame
from mycellm.network.joining import request_renewal
from mycellm.network.messages import (
    MAX_NETWORKS_PER_MESSAGE,
    MAX_SIGNED_VALUE_BYTES,
    ErrorMessage,
    JoinRequestMessage,
    NetworkNewsMessage,
)
from mycellm.network.service import PeerService
from mycellm.types import NetworkId
from tests.federation.kit import new_key, resign
from tests.peer_kit import (
    admitted_for,
    authority_books,
    host_network,
    peer_service,
    recorded_invite,
    start_service,
    wait_for,
)


def _address(service: PeerService) -> str:
    return f"127.0.0.1:{service.port}"


async def _authority(tmp_path: Path, services: list[PeerService]) -> tuple[PeerService, HostedNetwork]:
    """An authority node hosting the private network ``lab``, its address in the description."""
    network = host_network(tmp_path, "authority", "lab")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    placed = next_description(authority.identity, network, bootstrap=[_address(authority)])
    await authority.networks.load()
    return authority, placed


def _membership_file(service: PeerService, network_id: str) -> bytes:
    path = service._settings.resolved_data_dir / MEMBERSHIPS_DIR / network_id / MEMBERSHIP_FILE
    return path.read_bytes()


async def _book_certificate(authority: PeerService, network_id: str, account_id: str) -> bytes:
    store, book = await authority_books(authority)
    try:
        kept = await book.membership(network_id, account_id)
    finally:
        await store.close()
    assert kept is not None
    return kept.certificate


def _served(service: PeerService, peer: PeerService, network_id: str) -> MembershipCertificate:
    certificate = service.session(peer.peer_id, NetworkId(network_id)).networks[NetworkId(network_id)]
    assert certificate is not None
    return certificate


def test_renewal_is_due_in_the_last_third_of_the_validity_and_not_once_lapsed() -> None:
    key = new_key()
    description = issue_network_description(key, name="lab", default=False)
    membership = issue_membership(key, description, b"\x01" * 32, validity_s=30 * 86400, now=1000)
    assert not renewal_due(membership, 1000 + 19 * 86400)
    assert renewal_due(membership, 1000 + 21 * 86400)
    assert not renewal_due(membership, 1000 + 30 * 86400)  # lapsed: the member joins again
    assert not renewal_due(membership, 999)  # not valid yet


async def test_a_member_renews_before_expiry_and_keeps_its_links(
    tmp_path: Path, services: list[PeerService]
) -> None:
    authority, network = await _authority(tmp_path, services)
    network_id = network.network_id
    short = await admitted_for(tmp_path, authority, network, "a", validity_s=12)
    a = await start_service(services, peer_service(tmp_path, "a", member=False))
    b = await start_service(services, peer_service(tmp_path, "b", member=False))
    await b.join(_address(authority), await recorded_invite(authority, network))
    await a.connect(_address(b))
    await wait_for(lambda: len(a.connected()) == 2 and len(b.connected()) == 2, what="a full mesh")
    # Both peers admitted a with its short-lived membership.
    assert _served(authority, a, network_id).serial == 0 and _served(b, a, network_id).serial == 0

    # Less than a third of its validity left: the heartbeat asks the authority for a fresh one.
    await wait_for(
        lambda: a.networks.held.get(network_id).membership.serial == 1,  # type: ignore[union-attr]
        timeout_s=10.0,
        what="a renewed",
    )
    held = a.networks.held.get(network_id)
    assert held is not None
    renewed = held.membership
    assert renewed.role == short.role and renewed.member_account_public_key == short.member_account_public_key
    assert renewed.expires_at - renewed.issued_at == 30 * 86400
    assert time.time() < short.expires_at, "renewed only after the old membership expired"
    assert _membership_file(a, network_id) == renewed.to_bytes()
    assert await _book_certificate(authority, network_id, a.identity.account_id) == renewed.to_bytes()
    assert renewed.to_bytes() in a.networks.memberships()  # what its next hellos present
    # Its peers took the renewed membership for their links to a.
    await wait_for(
        lambda: _served(authority, a, network_id).serial == 1 and _served(b, a, network_id).serial == 1,
        what="the peers hold a's renewed membership",
    )

    # Past the old expiry the links still serve the network.
    await asyncio.sleep(
        max(0.0, short.expires_at - time.time()) + 3 * authority._settings.heartbeat_interval_s
    )
    assert a.peer_id in authority.connected() and a.peer_id in b.connected()
    assert network_id in b.session(a.peer_id, NetworkId(network_id)).networks
    assert network_id in authority.session(a.peer_id, NetworkId(network_id)).networks
    # A new link is admitted with the renewed membership.
    c = await start_service(services, peer_service(tmp_path, "c", member=False))
    await c.join(_address(authority), await recorded_invite(authority, network))
    await c.connect(_address(a))
    assert _served(c, a, network_id).serial == 1
    # Renewed once: the new membership is not due for 20 days.
    assert a._joins.renewals.attempts[NetworkId(network_id)] == 1


async def test_a_revoked_member_is_refused_and_nothing_is_kept(
    tmp_path: Path, services: list[PeerService]
) -> None:
    authority, network = await _authority(tmp_path, services)
    network_id = network.network_id
    a = await start_service(services, peer_service(tmp_path, "a", member=False))
    await a.join(_address(authority), await recorded_invite(authority, network))
    # Revoked as ``mycellm network revoke`` does: in the books, then in the signed list.
    store, book = await authority_books(authority)
    try:
        await book.revoke_member(network_id, a.identity.account_id, time.time())
    finally:
        await store.close()
    before_book = await _book_certificate(authority, network_id, a.identity.account_id)
    held = a.networks.held.get(network_id)
    assert held is not None
    before_file = _membership_file(a, network_id)
    with pytest.raises(MembershipError, match="revoked"):
        await a._joins.renewals.renew(held)  # refused by the books
    revoke_member(authority.identity, network, a.identity.certificate.account_public_key)
    await authority.networks.load()
    with pytest.raises(MembershipError, match="revoked"):
        await request_renewal(a.endpoint, _address(authority), held)  # refused by the list
    assert _membership_file(a, network_id) == before_file
    kept = a.networks.held.get(network_id)
    assert kept is not None and kept.membership == held.membership
    assert await _book_certificate(authority, network_id, a.identity.account_id) == before_book
    # The refusal backs off: no second request within the interval.
    renewals = a._joins.renewals
    assert renewals._next[NetworkId(network_id)] >= time.time() + renewals.retry_s - 5.0


async def test_a_lapsed_member_cannot_renew(tmp_path: Path, services: list[PeerService]) -> None:
    authority, network = await _authority(tmp_path, services)
    network_id = network.network_id
    lapsed = await admitted_for(tmp_path, authority, network, "a", validity_s=1)
    await asyncio.sleep(max(0.0, lapsed.expires_at - time.time()) + 0.1)
    a = await start_service(services, peer_service(tmp_path, "a", member=False))
    held = a.networks.held.get(network_id)
    assert held is not None and held.membership == lapsed
    with pytest.raises(FederationError, match="expired"):
        await request_renewal(a.endpoint, _address(authority), held)
    await asyncio.sleep(5 * a._settings.heartbeat_interval_s)
    assert a._joins.renewals.attempts[NetworkId(network_id)] == 0  # the heartbeat does not ask
    assert _membership_file(a, network_id) == lapsed.to_bytes()
    assert await _book_certificate(authority, network_id, a.identity.account_id) == lapsed.to_bytes()


async def test_forged_renewals_are_refused(tmp_path: Path, services: list[PeerService]) -> None:
    authority, network = await _authority(tmp_path, services)
    network_id = network.network_id
    other = host_network(tmp_path, "other", "lab")
    a = await start_service(services, peer_service(tmp_path, "a", member=False))
    b = await start_service(services, peer_service(tmp_path, "b", member=False))
    for member in (a, b):
        await member.join(_address(authority), await recorded_invite(authority, network))
    held_a, held_b = a.networks.held.get(network_id), b.networks.held.get(network_id)
    assert held_a is not None and held_b is not None
    books = {
        member.peer_id: await _book_certificate(authority, network_id, member.identity.account_id)
        for member in (a, b)
    }
    files = {member.peer_id: _membership_file(member, network_id) for member in (a, b)}
    mine = held_a.membership
    tampered = MembershipCertificate.model_validate(mine.model_dump() | {"role": "admin"})
    foreign_key = resign(mine, new_key(), expires_at=mine.expires_at + 86400)
    other_key = load_or_create_identity(tmp_path / "other", node_name="other").account_key
    assert other_key is not None
    elsewhere = issue_membership(
        other_key,
        other.description,
        a.identity.certificate.account_public_key,
    )
    lab, foreign = held_a.description, other.description
    cases: list[tuple[PeerService, NetworkDescription, MembershipCertificate, type[Exception], str]] = [
        (b, lab, mine, FederationError, "not to member"),  # another account's membership
        (a, lab, tampered, FederationError, "signature"),
        (a, lab, foreign_key, FederationError, "signature"),
        (a, foreign, elsewhere, MembershipError, "hosts no network"),  # another authority's network
        (a, lab, elsewhere, FederationError, "another network"),  # a request naming another one
    ]
    for member, description, presented, error_type, fragment in cases:
        forged = HeldNetwork(description, presented, None, hosted=False)
        with pytest.raises(error_type, match=fragment):
            await request_renewal(member.endpoint, _address(authority), forged)
    # A renewal that also carries an invite is no renewal.
    link = await a.endpoint.connect("127.0.0.1", authority.port)
    try:
        stream = link.open_stream()
        token = await recorded_invite(authority, network)
        stream.send(JoinRequestMessage(invite=token.to_bytes(), membership=mine.to_bytes()))
        answer = await stream.receive(5.0)
    finally:
        link.close("done")
    assert isinstance(answer, ErrorMessage) and "no invite" in answer.message
    for member in (a, b):
        assert _membership_file(member, network_id) == files[member.peer_id]
        assert (
            await _book_certificate(authority, network_id, member.identity.account_id)
            == books[member.peer_id]
        )

    # A member passing on another account's renewed membership changes nothing on its links.
    await a.connect(_address(b))
    await wait_for(lambda: a.peer_id in b.connected(), what="a and b linked")
    renewed = await a._joins.renewals.renew(held_a)
    assert renewed.membership.serial == 1
    await wait_for(lambda: _served(b, a, network_id).serial == 1, what="b holds a's renewal")
    b_at_a = a.session(b.peer_id, NetworkId(network_id))
    b.session(a.peer_id, NetworkId(network_id)).send(
        NetworkNewsMessage(memberships=(renewed.membership.to_bytes(), b"\x00garbage"))
    )
    await asyncio.sleep(0.5)
    assert b_at_a.networks[NetworkId(network_id)] == held_b.membership


async def test_failed_renewals_back_off_and_a_success_stops_them(
    tmp_path: Path, services: list[PeerService]
) -> None:
    authority, network = await _authority(tmp_path, services)
    network_id = NetworkId(network.network_id)
    await admitted_for(tmp_path, authority, network, "a", validity_s=60)
    a = await start_service(services, peer_service(tmp_path, "a", member=False, heartbeat_interval_s=0.1))
    renewals = a._joins.renewals
    renewals.retry_s, renewals.max_backoff_s = 0.2, 0.8
    renewals._clock = lambda: time.time() + 45  # the renewals' clock only: 15 of 60 s left, due
    asked: list[float] = []
    real_ask = renewals._ask

    async def away(address: str, held: HeldNetwork) -> object:
        asked.append(time.monotonic())
        raise PeerError(f"{address} is away")

    renewals._ask = away  # type: ignore[assignment]
    await wait_for(lambda: len(asked) >= 5, timeout_s=15.0, what="five renewal attempts")
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
    for index, gap in enumerate(gaps):
        assert gap >= min(0.2 * 2**index, 0.8) - 0.02, gaps  # doubling, never under the interval
    assert max(gaps) < 0.8 + 0.5, gaps  # capped
    held = a.networks.held.get(network_id)
    assert held is not None and held.membership.serial == 0
    assert _membership_file(a, network_id) == held.membership.to_bytes()

    renewals._ask = real_ask  # the authority answers again
    await wait_for(
        lambda: a.networks.held.get(network_id).membership.serial == 1,  # type: ignore[union-attr]
        timeout_s=5.0,
        what="a renewed",
    )
    attempts = renewals.attempts[network_id]
    await asyncio.sleep(10 * a._settings.heartbeat_interval_s)
    assert renewals.attempts[network_id] == attempts  # renewed for 30 days: nothing due


def test_the_renewal_fields_have_bounds_and_round_trip() -> None:
    request = JoinRequestMessage(network_id="a" * 64, membership=b"\x01" * 100)
    news = NetworkNewsMessage(memberships=(b"\x02" * 10,))
    frames = encode_frame(request) + encode_frame(news)
    assert list(FrameReader().feed(frames)) == [request, news]
    with pytest.raises(ValidationError):
        JoinRequestMessage(membership=b"\x01" * (MAX_SIGNED_VALUE_BYTES + 1))
    with pytest.raises(ValidationError):
        NetworkNewsMessage(memberships=(b"",) * (MAX_NETWORKS_PER_MESSAGE + 1))
    with pytest.raises(ValidationError):
        NetworkNewsMessage(memberships=(b"\x00" * (MAX_SIGNED_VALUE_BYTES + 1),))
