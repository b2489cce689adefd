"""Peer hints under attack: bounded per relay, address group and account; dialed in turn, a few a
minute, never crowding out bootstraps or peers linked before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.network.dialer import Dialer
from mycellm.network.messages import PeerAddress
from mycellm.network.peer_addresses import (
    read_address,
)
from mycellm.network.service import PeerService
from tests.peer_exchange_kit import (
    hints,
    mint,
    mint_with_id,
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
