"""Peer exchange under attack: learned addresses are signed hints that no peer can forge, replay, point
at private ranges, flood, or use to make a node dial many addresses or crowd out honest peers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.identity.revocations import issue_revocation_list
from mycellm.network.messages import MAX_PEERS_PER_MESSAGE, PeerAddress, PeersMessage
from mycellm.network.peer_addresses import (
    ADDRESS_MAX_AGE_S,
    AddressPolicy,
    sign_address,
)
from mycellm.network.peer_hints import HintLimits, PeerHints
from mycellm.network.service import PeerService
from tests.peer_exchange_kit import (
    failures,
    hints,
    linked,
    mint,
    public_address,
    resigned,
)
from tests.peer_kit import peer_service, start_service, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def services() -> AsyncIterator[list[PeerService]]:
    started: list[PeerService] = []
    yield started
    for service in reversed(started):
        await service.stop()


def _forgeries() -> dict[str, PeerAddress]:
    honest, identity = mint("8.8.8.8:8421")
    other = Ed25519PrivateKey.generate()
    victim, _ = mint("8.8.4.4:8421")
    tampered = identity.certificate.model_copy(update={"signature": bytes(64)})
    return {
        "signed by another key": resigned(honest, other),
        "peer id of another certificate": resigned(honest, identity.device_key, peer_id=victim.peer_id),
        "entry naming another peer": PeerAddress(peer_id=victim.peer_id, record=honest.record),
        "certificate the account did not sign": resigned(
            honest, identity.device_key, certificate=tampered.to_bytes()
        ),
        "not a record": PeerAddress(peer_id=honest.peer_id, record=b"\xa1junk"),
    }


@pytest.mark.parametrize("forgery", sorted(_forgeries()))
async def test_a_forged_entry_is_dropped_and_counted_against_its_sender(
    tmp_path: Path, services: list[PeerService], forgery: str
) -> None:
    server, peer, session = await linked(services, tmp_path)
    entry = _forgeries()[forgery]
    before = failures(server, peer.peer_id)
    server._control.handle(session, PeersMessage(peers=(entry,)))
    assert server.hints.get(entry.peer_id) is None and len(server.hints) == 0
    assert failures(server, peer.peer_id) >= before + 0.9


async def test_a_list_with_a_forged_entry_is_not_read_further(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server, _, session = await linked(services, tmp_path)
    kept, _ = mint("8.8.8.8:8421")
    after, _ = mint("8.8.4.4:8421")
    forged = _forgeries()["signed by another key"]
    server._control.handle(session, PeersMessage(peers=(kept, forged, after)))
    assert server.hints.get(kept.peer_id) is not None
    assert server.hints.get(after.peer_id) is None


async def test_a_replayed_older_record_never_replaces_a_newer_one(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server, peer, session = await linked(services, tmp_path)
    now = time.time()
    newer, identity = mint("8.8.8.8:8421", signed_at=now - 10)
    older = resigned(newer, identity.device_key, address="9.9.9.9:8421", signed_at=int(now - 100))
    server._control.handle(session, PeersMessage(peers=(newer,)))
    server._control.handle(session, PeersMessage(peers=(older,)))
    hint = server.hints.get(newer.peer_id)
    assert hint is not None and hint.address == "8.8.8.8:8421"
    newest = resigned(newer, identity.device_key, address="1.1.1.1:8421", signed_at=int(now))
    server._control.handle(session, PeersMessage(peers=(newest,)))
    hint = server.hints.get(newer.peer_id)
    assert hint is not None and hint.address == "1.1.1.1:8421"
    # The same for what a linked peer says of itself: an old record of it is not taken.
    await wait_for(lambda: server._control.record_of(peer.peer_id), what="the peer's own record")
    own = server._control.record_of(peer.peer_id)
    assert own is not None
    stale_self = PeerAddress(
        peer_id=peer.peer_id,
        record=sign_address(peer.identity, "8.8.8.8:1", now=own.signed_at - 60).to_bytes(),
    )
    server._control.handle(session, PeersMessage(peers=(stale_self,)))
    assert server._control.record_of(peer.peer_id) == own
    assert failures(server, peer.peer_id) < 0.5  # an old record is no forgery


async def test_stale_future_expired_and_revoked_records_are_dropped_but_not_counted(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server, peer, session = await linked(services, tmp_path)
    now = time.time()
    account = Ed25519PrivateKey.generate()
    revoked, revoked_identity = mint("8.8.8.8:8421", account)
    revocation = issue_revocation_list(account, [revoked_identity.device_public_key], serial=1)
    assert server.revocations.accept((revocation.to_bytes(),), source=None)
    dropped = [
        mint("8.8.4.4:8421", signed_at=now - ADDRESS_MAX_AGE_S - 60)[0],
        mint("8.8.4.5:8421", signed_at=now + 3600)[0],
        mint("8.8.4.6:8421", certified_at=now - 7200, validity_s=3600)[0],
        revoked,
    ]
    server._control.handle(session, PeersMessage(peers=tuple(dropped)))
    assert len(server.hints) == 0
    assert failures(server, peer.peer_id) < 0.5


# -- allowed ranges ----------------------------------------------------------------------------


REFUSED_BY_DEFAULT = [
    "127.0.0.1:8421",
    "[::1]:8421",
    "10.1.2.3:8421",
    "172.16.0.1:8421",
    "192.168.1.10:8421",
    "100.64.0.1:8421",
    "[fc00::1]:8421",
    "[::ffff:10.0.0.1]:8421",
    "169.254.1.1:8421",
    "[fe80::1]:8421",
    "0.0.0.0:8421",
    "[::]:8421",
    "224.0.0.1:8421",
    "[ff02::1]:8421",
    "240.0.0.1:8421",
    "255.255.255.255:8421",
    "192.0.2.1:8421",
    "node.example.com:8421",
    "localhost:8421",
]


@pytest.mark.parametrize("address", REFUSED_BY_DEFAULT)
def test_a_learned_address_outside_public_ranges_is_refused_by_default(address: str) -> None:
    table = hints()
    entry, _ = mint(address)
    assert table.hear(entry, source="relay") == "refused"
    assert len(table) == 0


def test_private_and_loopback_addresses_are_kept_when_the_config_allows_them() -> None:
    private = PeerHints(AddressPolicy(allow_private=True), HintLimits())
    for address in ("10.1.2.3:8421", "192.168.1.10:8421", "[fc00::1]:8421"):
        assert private.hear(mint(address)[0], source="relay") == "kept"
    for address in ("127.0.0.1:8421", "169.254.1.1:8421", "node.example.com:8421", "224.0.0.1:8421"):
        assert private.hear(mint(address)[0], source="relay") == "refused"
    loopback = PeerHints(AddressPolicy(allowed_networks=("127.0.0.0/8", "10.9.0.0/16")), HintLimits())
    assert loopback.hear(mint("127.0.0.1:8421")[0], source="relay") == "kept"
    assert loopback.hear(mint("10.9.1.1:8421")[0], source="relay") == "kept"
    assert loopback.hear(mint("10.8.1.1:8421")[0], source="relay") == "refused"
    assert hints().hear(mint("8.8.8.8:8421")[0], source="relay") == "kept"


# -- floods and eclipses -----------------------------------------------------------------------


async def test_a_flood_of_signed_entries_from_one_peer_stays_in_its_bounds_and_leaves_honest_ones(
    tmp_path: Path, services: list[PeerService]
) -> None:
    # 10,000 valid records of devices one account minted (before the links: minting blocks the loop).
    account = Ed25519PrivateKey.generate()
    entries = [mint(public_address(index), account)[0] for index in range(10_000)]
    # The flood queues ahead of the hostile peer's pongs: the server must not give up on it first.
    server = await start_service(services, peer_service(tmp_path, "server", heartbeat_interval_s=60))
    hostile = await start_service(services, peer_service(tmp_path, "hostile", heartbeat_interval_s=60))
    honest = await start_service(services, peer_service(tmp_path, "honest"))
    flood = await hostile.connect(f"127.0.0.1:{server.port}")
    await honest.connect(f"127.0.0.1:{server.port}")
    await wait_for(lambda: {hostile.peer_id, honest.peer_id} <= set(server.connected()), what="the links")
    honest_session = server._sessions.routed(honest.peer_id)
    assert honest_session is not None
    first, _ = mint("8.8.8.8:8421")
    server._control.handle(honest_session, PeersMessage(peers=(first,)))
    # The flood over the real link, then a ping: its pong means the server read every list before it.
    for start in range(0, len(entries), MAX_PEERS_PER_MESSAGE):
        flood.send(PeersMessage(peers=tuple(entries[start : start + MAX_PEERS_PER_MESSAGE])))
    marker = 1 << 40
    flood.send(flood.ping(marker))
    await wait_for(lambda: marker not in flood._pings, 60.0, "the server to read the flood")
    flooded = {entry.peer_id for entry in entries}
    held = {hint.peer_id for hint in server.hints.hints()}
    assert len(held & flooded) <= server._settings.max_hints_per_account
    assert len(server.hints) <= server._settings.max_peer_hints
    assert server.hints.get(first.peer_id) is not None  # the honest relay's entry is still there
    second, _ = mint("9.9.9.9:8421")
    server._control.handle(honest_session, PeersMessage(peers=(second,)))
    assert server.hints.get(second.peer_id) is not None  # and honest relays still get theirs in
    assert failures(server, hostile.peer_id) < 0.5  # signed entries are no forgery, only bounded
