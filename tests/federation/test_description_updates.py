"""Description updates over real links: the authority's next description reaches members two hops away
and changes their terms; older versions and descriptions signed by another key are ignored."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mycellm.cli.app import app
from mycellm.config import PriceSettings
from mycellm.federation.authority import DESCRIPTION_FILE, load_network, next_description
from mycellm.federation.descriptions import NetworkDescription, NetworkPrices, issue_network_description
from mycellm.federation.held import MEMBERSHIPS_DIR
from mycellm.identity.certificates import raw_public_key
from mycellm.identity.keys import load_or_create_identity
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.store import Store
from mycellm.network.messages import NetworkNewsMessage
from mycellm.network.service import PeerService
from mycellm.network.session import Session
from mycellm.network.settlement import CreditKeeper
from mycellm.types import NetworkId
from tests.federation.kit import new_key, resign
from tests.peer_kit import host_network, peer_service, recorded_invite, wait_for

NEW_TIERS = {"smollm2": "fast", "qwen2.5-7b": "capable"}
NEW_PRICES = PriceSettings(tier_prices={"frontier": 40.0, "capable": 8.0, "fast": 3.0, "tiny": 0.5})


@pytest.fixture
async def stores() -> AsyncIterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        await store.close()


async def _paid(
    root: Path, name: str, services: list[PeerService], stores: list[Store], **settings: object
) -> PeerService:
    """A node with books of every network it is in, started."""
    store = await Store.open(f"sqlite+aiosqlite:///{root / (name + '-books.db')}")
    stores.append(store)

    async def keepers(network_id: NetworkId, prices: PriceSettings) -> CreditKeeper:
        return CreditBook(store.engine, PriceTable(prices), network_id)

    service = peer_service(root, name, member=False, keepers=keepers, **settings)
    await service.start()
    services.append(service)
    return service


def _address(service: PeerService) -> str:
    return f"127.0.0.1:{service.port}"


def _stored(service: PeerService, network_id: str) -> bytes:
    return (
        service._settings.resolved_data_dir / MEMBERSHIPS_DIR / network_id / DESCRIPTION_FILE
    ).read_bytes()


def _terms_are(service: PeerService, network_id: str, description: NetworkDescription) -> bool:
    terms = service.networks.terms(NetworkId(network_id))
    held = service.networks.held.get(network_id)
    settler = terms.settler
    return (
        held is not None
        and held.description == description
        and terms.model_tiers == dict(description.model_tiers)
        and settler is not None
        and settler.prices.settings.tier_prices == description.prices.to_settings().tier_prices
        and isinstance(settler.keeper, CreditBook)  # the books price receipts at the same table
        and settler.keeper.prices.settings.tier_prices == settler.prices.settings.tier_prices
    )


def _inject(session: Session, *descriptions: NetworkDescription) -> None:
    """What a peer could send: descriptions as network news on its control stream."""
    session.send(NetworkNewsMessage(descriptions=tuple(item.to_bytes() for item in descriptions)))


async def test_a_newer_description_reaches_every_member_and_older_or_forged_ones_do_not(
    tmp_path: Path, services: list[PeerService], stores: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    network = host_network(tmp_path, "authority", "lab")
    network_id = network.network_id
    # A line: authority - m1 - m2 (one peer at most for the ends: peer exchange adds no shortcut).
    authority = await _paid(tmp_path, "authority", services, stores, max_peers=1)
    m1 = await _paid(tmp_path, "m1", services, stores)
    m2 = await _paid(tmp_path, "m2", services, stores, max_peers=1)
    late = await _paid(tmp_path, "late", services, stores, max_peers=1)
    for member in (m1, m2, late):
        await member.join(_address(authority), await recorded_invite(authority, network))
    await m1.connect(_address(authority))
    await m2.connect(_address(m1))
    await wait_for(lambda: len(m1.connected()) == 2, what="the line linked")
    original = network.description
    for node in (authority, m1, m2):
        assert _terms_are(node, network_id, original)

    # The authority signs serial 1 with new prices and tiers; its heartbeat reads it from disk.
    started = time.monotonic()
    published = next_description(
        authority.identity,
        load_network(tmp_path / "authority", "lab"),
        prices=NetworkPrices.from_settings(NEW_PRICES),
        model_tiers=NEW_TIERS,
    ).description
    assert published.serial == original.serial + 1
    await wait_for(
        lambda: all(_terms_are(node, network_id, published) for node in (authority, m1, m2)),
        timeout_s=5.0,
        what="the new description everywhere",
    )
    elapsed = time.monotonic() - started
    assert elapsed < 4 * authority._settings.heartbeat_interval_s + 1.0, elapsed
    assert m2.connected() == [m1.peer_id] and authority.connected() == [m1.peer_id]
    for member in (m1, m2):
        assert _stored(member, network_id) == published.to_bytes()
        terms = member.networks.terms(NetworkId(network_id))
        assert terms.model_tiers == NEW_TIERS
        assert terms.settler is not None and terms.settler.prices.rate("smollm2", "fast") == 3.0

    # A member that was away catches up when it links.
    assert _stored(late, network_id) == original.to_bytes()
    await late.connect(_address(m1))
    await wait_for(lambda: _terms_are(late, network_id, published), what="the late member caught up")
    assert _stored(late, network_id) == published.to_bytes()

    # Replayed and forged versions, sent to m1: refused there, and not passed on to m2.
    other_key = new_key()
    forged_signature = resign(published, other_key, serial=published.serial + 5)
    forged_authority = resign(
        published,
        other_key,
        serial=published.serial + 6,
        authority_public_key=raw_public_key(other_key),
    )
    foreign = issue_network_description(other_key, name="lab", default=False, serial=9)
    heard_by_m2: list[NetworkNewsMessage] = []
    heard = m2.networks.heard

    async def recording(session: Session, message: NetworkNewsMessage) -> None:
        heard_by_m2.append(message)
        await heard(session, message)

    m2.networks.heard = recording  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="mycellm.network.network_links")
    _inject(authority.session(m1.peer_id), original)
    _inject(authority.session(m1.peer_id), forged_signature, forged_authority, foreign)

    def refused_from(sender: PeerService) -> int:
        return sum(
            "was refused" in record.getMessage() and sender.peer_id[:12] in record.getMessage()
            for record in caplog.records
        )

    await wait_for(lambda: refused_from(authority) >= 2, what="m1 refused the forged descriptions")
    await asyncio.sleep(4 * m1._settings.heartbeat_interval_s)
    assert not any(message.descriptions for message in heard_by_m2), heard_by_m2
    # And sent to m2 directly: refused there too.
    _inject(m1.session(m2.peer_id), original, forged_signature, forged_authority, foreign)
    await wait_for(lambda: refused_from(m1) >= 2, what="m2 refused the forged descriptions")
    await asyncio.sleep(2 * m2._settings.heartbeat_interval_s)
    for node in (authority, m1, m2, late):
        assert _terms_are(node, network_id, published)
        assert node.networks.held.get(foreign.network_id) is None
    for member in (m1, m2, late):
        assert _stored(member, network_id) == published.to_bytes()


def test_network_publish_signs_the_next_description_from_the_config(tmp_path: Path) -> None:
    data_dir = tmp_path / "authority"
    load_or_create_identity(data_dir, node_name="authority")
    config = tmp_path / "node.yaml"

    def cli(*args: str) -> Any:
        return CliRunner().invoke(
            app,
            ["network", *args, "--data-dir", str(data_dir), "--config", str(config)],
            env={"COLUMNS": "200"},
        )

    config.write_text("models: []\n")
    created = cli("create", "lab", "--private")
    assert created.exit_code == 0, created.output
    unchanged = cli("publish", "lab")
    assert unchanged.exit_code == 0 and "serial 0 (unchanged)" in unchanged.output, unchanged.output
    config.write_text(
        "models: []\ncredits:\n  tier_prices: {tiny: 0.5, fast: 3.0, capable: 8.0, frontier: 40.0}\n"
    )
    published = cli("publish", "lab")
    assert published.exit_code == 0 and "serial 1 (published" in published.output, published.output
    description = load_network(data_dir, "lab").description
    assert description.serial == 1 and description.prices == NetworkPrices.from_settings(NEW_PRICES)
    unknown = cli("publish", "nowhere")
    assert unknown.exit_code == 1 and "no hosted network" in unknown.output
