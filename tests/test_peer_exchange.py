"""Peer exchange under attack: learned addresses are signed hints that no peer can forge, replay, point
at private ranges, flood, or use to make a node dial many addresses or crowd out honest peers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.identity.certificates import issue_device_certificate, raw_public_key
from mycellm.identity.keys import NodeIdentity
from mycellm.identity.revocations import issue_revocation_list
from mycellm.network.dialer import Dialer
from mycellm.network.messages import MAX_PEERS_PER_MESSAGE, PeerAddress, PeersMessage
from mycellm.network.peer_addresses import (
    ADDRESS_MAX_AGE_S,
    AddressPolicy,
    AddressRecord,
    read_address,
    sign_address,
)
from mycellm.network.peer_hints import HintLimits, PeerHints
from mycellm.network.service import PeerService
from mycellm.network.session import Session
from mycellm.types import PeerId
from tests.peer_kit import peer_service, start_service, wait_for

pytestmark = pytest.mark.timeout(180)


def mint(
    address: str,
    account: Ed25519PrivateKey | None = None,
    *,
    signed_at: float | None = None,
    certified_at: float | None = None,
    validity_s: int = 86400,
) -> tuple[PeerAddress, NodeIdentity]:
    """A new device (of ``account``, or of an account of its own) and its signed record of ``address``."""
    account = account or Ed25519PrivateKey.generate()
    device = Ed25519PrivateKey.generate()
    certificate = issue_device_certificate(
        account, raw_public_key(device), name="minted", validity_s=validity_s, now=certified_at
    )
    identity = NodeIdentity(account, device, certificate)
    record = sign_address(identity, address, now=signed_at)
    return PeerAddress(peer_id=PeerId(record.peer_id), record=record.to_bytes()), identity


def resigned(entry: PeerAddress, key: Ed25519PrivateKey, **fields: object) -> PeerAddress:
    """``entry``'s record with ``fields`` changed and signed again by ``key``."""
    record = AddressRecord.parse_canonical(entry.record, what="record", max_bytes=4096, version=1)
    changed = record.model_copy(update=fields)
    signed = changed.model_copy(update={"signature": key.sign(changed.signed_payload())})
    return PeerAddress(peer_id=PeerId(signed.peer_id), record=signed.to_bytes())


def mint_with_id(address: str, first_characters: str) -> PeerAddress:
    """A minted entry whose peer id starts with one of ``first_characters`` (ids are cheap to grind)."""
    while True:
        entry, _ = mint(address)
        if entry.peer_id[0] in first_characters:
            return entry


def public_address(index: int) -> str:
    """A distinct public IPv4 address in its own /16 for each index below 60,000 or so."""
    return f"{11 + index // 256 % 80}.{index % 256}.{index // 20480 + 1}.1:8421"


def hints(**limits: int) -> PeerHints:
    return PeerHints(AddressPolicy(), HintLimits(**limits))


# -- the control handler of a real node, fed by a real linked peer -------------------------------


@pytest.fixture
async def services() -> AsyncIterator[list[PeerService]]:
    started: list[PeerService] = []
    yield started
    for service in reversed(started):
        await service.stop()


async def linked(
    services: list[PeerService], tmp_path: Path, **settings: object
) -> tuple[PeerService, PeerService, Session]:
    """A server and a peer linked to it; the server's session of that peer (what its handler reads)."""
    server = await start_service(services, peer_service(tmp_path, "server", **settings))
    peer = await start_service(services, peer_service(tmp_path, "peer"))
    await peer.connect(f"127.0.0.1:{server.port}")
    await wait_for(lambda: peer.peer_id in server.connected(), what="the session at the server")
    session = server._sessions.routed(peer.peer_id)
    assert session is not None
    return server, peer, session


def failures(service: PeerService, peer_id: str) -> float:
    record = service.registry.get(peer_id)
    assert record is not None
    return record.failures


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


def test_one_relay_holds_at_most_its_bucket_even_with_an_account_per_entry() -> None:
    table = hints(max_hints=64, per_source=16)
    verdicts = [table.hear(mint(public_address(index))[0], source="hostile") for index in range(300)]
    assert verdicts.count("kept") == 16 and len(table) == 16
    honest, _ = mint("8.8.8.8:8421")
    assert table.hear(honest, source="honest") == "kept"


def test_one_address_group_and_one_account_hold_at_most_their_bucket() -> None:
    table = hints(per_group=4, per_account=3)
    same_block = [mint(f"8.8.{index}.1:8421")[0] for index in range(10)]  # one /16, many relays
    assert [table.hear(entry, source=f"relay-{index}") for index, entry in enumerate(same_block)].count(
        "kept"
    ) == 4
    account = Ed25519PrivateKey.generate()
    devices = [mint(public_address(100 + index), account)[0] for index in range(10)]
    assert [table.hear(entry, source=f"other-{index}") for index, entry in enumerate(devices)].count(
        "kept"
    ) == 3


def test_a_full_table_makes_room_from_the_largest_relay_only() -> None:
    table = hints(max_hints=20, per_source=16)
    hostile = [mint(public_address(index))[0] for index in range(16)]
    for entry in hostile:
        assert table.hear(entry, source="hostile") == "kept"
    for index in range(4):
        assert table.hear(mint(public_address(1000 + index))[0], source=f"honest-{index}") == "kept"
    assert len(table) == 20
    # Full: a newcomer from a small relay displaces the hostile relay's oldest hint ...
    assert table.hear(mint("8.8.8.8:8421")[0], source="newcomer") == "kept"
    assert len(table) == 20 and table.get(hostile[0].peer_id) is None
    # ... while one more from the largest relay, or from one as large as the rest, is refused.
    assert table.hear(mint(public_address(2000))[0], source="hostile") == "full"
    assert table.get(hostile[1].peer_id) is not None


def test_hints_are_dialed_one_per_relay_in_turn_whatever_their_peer_ids() -> None:
    for _ in range(10):  # each table draws its own order
        table = hints()
        for index in range(32):  # ids ground to sort before any honest one
            assert table.hear(mint_with_id(public_address(index), "0"), source="hostile") == "kept"
        assert table.hear(mint_with_id("8.8.8.8:8421", "ef"), source="honest") == "kept"
        assert "8.8.8.8:8421" in table.pick(2)
        assert len(table.pick(100)) == 33


def test_a_hint_dialed_three_times_is_dropped_and_a_linked_peer_is_forgotten() -> None:
    table = hints()
    dropped, identity = mint("8.8.8.8:8421", signed_at=time.time() - 60)
    linked_peer, _ = mint("8.8.4.4:8421")
    table.hear(dropped, source="relay")
    table.hear(linked_peer, source="relay")
    table.dialed("8.8.8.8:8421")
    table.dialed("8.8.8.8:8421")
    # A newer record of the same address does not start its count again.
    assert (
        table.hear(resigned(dropped, identity.device_key, signed_at=int(time.time())), source="relay")
        == "kept"
    )
    table.dialed("8.8.8.8:8421")
    table.forget(linked_peer.peer_id)
    assert len(table) == 0


# -- dialing -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_dialer_dials_at_most_so_many_learned_addresses_a_minute_and_every_bootstrap() -> None:
    clock = FakeClock()
    dialed: list[str] = []

    async def dial(address: str) -> bool:
        dialed.append(address)
        raise OSError("nobody there")

    learned = [public_address(index) for index in range(50)]
    dialer = Dialer(
        lambda: ["192.168.1.1:8421", "127.0.0.1:9"],
        dial,
        max_backoff_s=1.0,
        hinted=lambda: learned,
        max_hint_dials_per_minute=5,
        clock=clock,
    )

    async def rounds(count: int, step_s: float) -> None:
        for _ in range(count):
            await asyncio.gather(*dialer.tick())
            clock.now += step_s

    await rounds(60, 0.5)  # 30 s
    assert len([address for address in dialed if address in learned]) == 5
    assert dialed.count("192.168.1.1:8421") >= 10 and dialed.count("127.0.0.1:9") >= 10
    await rounds(60, 0.5)  # up to a minute after the first five, not yet past it
    assert len([address for address in dialed if address in learned]) == 5
    await rounds(1, 0.5)  # a minute after them: five more
    assert len([address for address in dialed if address in learned]) == 10


async def test_bootstraps_and_peers_linked_before_are_dialed_and_not_counted_as_hints(tmp_path: Path) -> None:
    # No learned loopback allowed; the bootstrap is loopback and private ranges are off.
    service = peer_service(
        tmp_path, "node", allowed_peer_networks=(), bootstrap_peers=("127.0.0.1:9", "10.0.0.1:9")
    )
    remembered = "8.8.8.8:8421"
    service.registry.connected(
        "ab" * 32,
        account_id="cd" * 32,
        node_name="old",
        address=remembered,
        software_version="1",
        models=(),
        load=0,
    )
    service.registry.connected(
        "ef" * 32,
        account_id="cd" * 32,
        node_name="lan",
        address="10.0.0.2:1",
        software_version="1",
        models=(),
        load=0,
    )
    learned, _ = mint("9.9.9.9:8421")
    assert service.hints.hear(learned, source="relay") == "kept"
    assert service.hints.hear(mint("127.0.0.1:8421")[0], source="relay") == "refused"
    wanted = service._targets.wanted()
    assert wanted[:2] == ["127.0.0.1:9", "10.0.0.1:9"]  # as configured, whatever the policy
    assert remembered in wanted and "10.0.0.2:1" not in wanted
    assert service._targets.hinted() == ["9.9.9.9:8421"]


# -- end to end --------------------------------------------------------------------------------


async def test_records_are_relayed_verbatim_and_a_learned_loopback_address_needs_the_setting(
    tmp_path: Path, services: list[PeerService]
) -> None:
    hub = await start_service(services, peer_service(tmp_path, "hub"))
    bootstrap = (f"127.0.0.1:{hub.port}",)
    # The leaf dials no hint itself, so any link to it is the other node's doing.
    leaf = await start_service(
        services, peer_service(tmp_path, "leaf", bootstrap_peers=bootstrap, max_hint_dials_per_minute=0)
    )
    await wait_for(lambda: hub._control.record_of(leaf.peer_id), what="the leaf's record at the hub")
    strict = await start_service(
        services, peer_service(tmp_path, "strict", bootstrap_peers=bootstrap, allowed_peer_networks=())
    )
    # The bootstrap is dialed as configured; the hub's list names the leaf, which is not kept.
    await wait_for(lambda: strict._control.record_of(hub.peer_id), what="a peer list from the hub")
    asker = hub._sessions.routed(strict.peer_id)
    assert asker is not None
    relayed = hub._control._shareable_peers(asker)
    leaf_record = hub._control.record_of(leaf.peer_id)
    assert leaf_record is not None
    assert PeerAddress(peer_id=leaf.peer_id, record=leaf_record.raw) in relayed
    assert read_address(relayed[0]).peer_id == hub.peer_id  # the sender's own record comes first
    assert strict.hints.get(leaf.peer_id) is None and leaf.peer_id not in strict.connected()
    assert hub.peer_id in strict.connected()
    # A node that allows loopback learns the leaf from the same hub and links to it.
    allowing = await start_service(services, peer_service(tmp_path, "allowing", bootstrap_peers=bootstrap))
    await wait_for(lambda: leaf.peer_id in allowing.connected(), 10.0, "a link learned by exchange")


async def test_a_node_that_may_dial_no_hint_links_its_bootstrap_only(
    tmp_path: Path, services: list[PeerService]
) -> None:
    hub = await start_service(services, peer_service(tmp_path, "hub"))
    bootstrap = (f"127.0.0.1:{hub.port}",)
    leaf = await start_service(
        services, peer_service(tmp_path, "leaf", bootstrap_peers=bootstrap, max_hint_dials_per_minute=0)
    )
    await wait_for(lambda: hub._control.record_of(leaf.peer_id), what="the leaf's record at the hub")
    quiet = await start_service(
        services, peer_service(tmp_path, "quiet", bootstrap_peers=bootstrap, max_hint_dials_per_minute=0)
    )
    await wait_for(lambda: quiet.hints.get(leaf.peer_id), what="the leaf as a hint")
    await asyncio.sleep(1.0)  # several dial rounds: none may spend a budget of zero
    assert quiet.connected() == [hub.peer_id]
    assert quiet.hints.get(leaf.peer_id) is not None
