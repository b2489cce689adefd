"""Networks on real links over loopback: joins over QUIC, membership checked before any frame, revocation, isolation."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from mycellm.cli.app import app
from mycellm.config import ModelSettings, PriceSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import FederationError, MembershipError, PeerError
from mycellm.federation.authority import (
    HostedNetwork,
    invite,
    load_network,
    next_description,
    revoke_member,
)
from mycellm.federation.descriptions import JoinPolicy
from mycellm.federation.invites import InviteToken
from mycellm.identity.keys import load_or_create_identity
from mycellm.ledger.credit_tables import ReceiptRow
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.memberships import MembershipBook
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.store import Store
from mycellm.network.joining import request_join
from mycellm.network.messages import ErrorMessage, InferenceMessage
from mycellm.network.quic import QuicEndpoint
from mycellm.network.service import PeerService
from mycellm.network.settlement import CreditKeeper
from mycellm.types import GenerationRequest, NetworkId
from tests.peer_kit import host_network, peer_service, start_service, wait_for

NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


def _address(service: PeerService) -> str:
    return f"127.0.0.1:{service.port}"


async def _invite(root: Path, authority: PeerService, network: HostedNetwork, **terms: object) -> InviteToken:
    """Sign an invite and keep it in the authority's books, as ``mycellm network invite`` does."""
    token = invite(authority.identity, network, **terms)  # type: ignore[arg-type]
    store = await Store.open(authority._settings.resolved_database_url)
    try:
        await MembershipBook(store.engine).record_invite(
            token.network_id, token.nonce, token.role, token.max_uses, token.expires_at, token.bind_key
        )
    finally:
        await store.close()
    return token


async def _members(authority: PeerService, network_id: str) -> list[str]:
    store = await Store.open(authority._settings.resolved_database_url)
    try:
        return sorted(member.account_id for member in await MembershipBook(store.engine).members(network_id))
    finally:
        await store.close()


def _request(model: str, network_id: str | None) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"net-{next(NUMBERS)}",
        model=model,
        messages=({"role": "user", "content": "Say yes."},),
        max_tokens=1,
        temperature=0,
        network_id=None if network_id is None else NetworkId(network_id),
    )


async def test_a_private_network_admits_only_its_invited_members(
    tmp_path: Path, engine: LlamaCppEngine, services: list[PeerService]
) -> None:
    network = host_network(tmp_path, "authority", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    a = await start_service(services, peer_service(tmp_path, "a", [engine], member=False))
    b = await start_service(services, peer_service(tmp_path, "b", [engine], member=False))
    stranger = await start_service(services, peer_service(tmp_path, "stranger", [engine], member=False))
    token = await _invite(tmp_path, authority, network, role="seeder", max_uses=2)
    for member in (a, b):
        joined = await member.join(_address(authority), InviteToken.from_text(token.to_text()))
        assert joined.network_id == network.network_id and joined.membership.role == "seeder"
    # A replay by a member changes nothing; the third account finds the invite used up.
    await a.join(_address(authority), token)
    with pytest.raises(MembershipError, match="used 2 times"):
        await stranger.join(_address(authority), token)
    assert stranger.networks.held.get(network.network_id) is None
    assert await _members(authority, network.network_id) == sorted(
        [a.identity.account_id, b.identity.account_id]
    )

    # The invited nodes link in the network and serve each other.
    await a.connect(_address(b))
    await wait_for(lambda: b.peer_id in a.connected() and a.peer_id in b.connected(), what="a and b linked")
    assert set(a.session(b.peer_id, NetworkId(network.network_id)).networks) == {network.network_id}
    result = await a.complete(b.peer_id, _request(engine.models()[0].name, network.network_id))
    assert result.usage.completion_tokens == 1

    # The uninvited node is refused at its hello: no session, no frame of it served, nothing learnt.
    for target in (authority, a):
        with pytest.raises(PeerError) as refused:
            await stranger.connect(_address(target))
        assert refused.value.code == "peer_not_a_member"
        assert stranger.peer_id not in target.connected() and target.serving == 0
        assert stranger.peer_id not in {record.peer_id for record in target.registry.records()}


async def test_bad_invites_are_refused_and_change_nothing(
    tmp_path: Path, services: list[PeerService]
) -> None:
    network = host_network(tmp_path, "authority", "lab", "private")
    elsewhere = host_network(tmp_path, "other", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    other = await start_service(services, peer_service(tmp_path, "other", member=False))
    joiner = await start_service(services, peer_service(tmp_path, "joiner", member=False))
    bystander = load_or_create_identity(tmp_path / "bystander", node_name="bystander")
    good = await _invite(tmp_path, authority, network, max_uses=5)
    tampered = InviteToken.model_validate(good.model_dump() | {"max_uses": 500})
    bound = await _invite(tmp_path, authority, network, bind_key=bystander.certificate.account_public_key)
    expired = await _invite(tmp_path, authority, network, validity_s=60, now=time.time() - 3600)
    foreign = await _invite(tmp_path, other, elsewhere)
    cases: list[tuple[InviteToken, type[Exception], str]] = [
        (tampered, FederationError, "signature"),
        (bound, FederationError, "bound to another"),
        (expired, FederationError, "expired"),
        (foreign, MembershipError, "hosts no network"),
    ]
    for token, error_type, fragment in cases:
        with pytest.raises(error_type, match=fragment):
            await joiner.join(_address(authority), token)
    assert await _members(authority, network.network_id) == []
    store = await Store.open(authority._settings.resolved_database_url)
    try:
        kept = await MembershipBook(store.engine).invite(good.network_id, good.nonce)
    finally:
        await store.close()
    assert kept is not None and kept.uses == 0
    assert joiner.networks.held.get(network.network_id) is None and len(joiner.networks.held) == 1  # its own


async def test_max_uses_is_exact_under_concurrent_joins_over_quic(
    tmp_path: Path, services: list[PeerService]
) -> None:
    network = host_network(tmp_path, "authority", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    token = await _invite(tmp_path, authority, network, max_uses=5)

    async def ignore(link: object, stream: object) -> None:
        return None

    endpoints = [
        QuicEndpoint(load_or_create_identity(tmp_path / f"j{index}", node_name=f"j{index}"), on_stream=ignore)  # type: ignore[arg-type]
        for index in range(20)
    ]
    try:
        outcomes = await asyncio.gather(
            *(request_join(endpoint, _address(authority), invite=token) for endpoint in endpoints),
            return_exceptions=True,
        )
    finally:
        for endpoint in endpoints:
            await endpoint.close()
    admitted = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(admitted) == 5, refused
    assert all(isinstance(error, MembershipError) and "used 5 times" in str(error) for error in refused)
    assert len(await _members(authority, network.network_id)) == 5


async def test_a_public_network_admits_without_invite_within_its_policy(
    tmp_path: Path, services: list[PeerService]
) -> None:
    policy = JoinPolicy(max_joins_per_address_per_hour=3, max_joins_per_address_per_day=3)
    network = host_network(tmp_path, "authority", "open", "public", policy)
    private = host_network(tmp_path, "authority", "closed", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    joiners = [
        await start_service(services, peer_service(tmp_path, f"fresh{index}", member=False))
        for index in range(5)
    ]
    outcomes = []
    for joiner in joiners:
        try:
            outcomes.append(await joiner.join(_address(authority), network_id=network.network_id))
        except MembershipError as error:
            outcomes.append(error)  # type: ignore[arg-type]
    assert sum(not isinstance(item, MembershipError) for item in outcomes) == 3
    assert all("too many joins" in str(item) for item in outcomes[3:])
    assert len(await _members(authority, network.network_id)) == 3
    with pytest.raises(MembershipError, match="takes an invite"):
        await joiners[0].join(_address(authority), network_id=private.network_id)


async def test_a_revoked_member_loses_its_links_within_a_heartbeat_round(
    tmp_path: Path, services: list[PeerService]
) -> None:
    network = host_network(tmp_path, "authority", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    a = await start_service(services, peer_service(tmp_path, "a", member=False))
    b = await start_service(services, peer_service(tmp_path, "b", member=False))
    token = await _invite(tmp_path, authority, network, max_uses=2)
    for member in (a, b):
        await member.join(_address(authority), token)
    await a.connect(_address(authority))
    await b.connect(_address(authority))
    await a.connect(_address(b))
    await wait_for(lambda: len(a.connected()) == 2 and len(b.connected()) == 2, what="a full mesh")
    # The authority revokes b offline (``mycellm network revoke``); its running node reads it, and
    # the revocation reaches a over the network.
    hosted = load_network(tmp_path / "authority", "lab")
    revoke_member(authority.identity, hosted, b.identity.certificate.account_public_key)
    started = time.monotonic()
    await wait_for(
        lambda: (
            b.peer_id not in authority.connected() and b.peer_id not in a.connected() and not b.connected()
        ),
        timeout_s=5.0,
        what="b's links closed",
    )
    elapsed = time.monotonic() - started
    assert elapsed < 3 * authority._settings.heartbeat_interval_s + 1.0, elapsed
    held = a.networks.held.get(network.network_id)
    assert held is not None and held.revocations is not None
    assert held.revocations.is_revoked(b.identity.certificate.account_public_key)
    with pytest.raises(PeerError) as refused:
        await b.connect(_address(a))
    assert refused.value.code == "peer_not_a_member"


async def _paid(tmp_path: Path, name: str, engines: list[LlamaCppEngine], stores: list[Store]) -> PeerService:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / (name + '-books.db')}")
    stores.append(store)

    async def keepers(network_id: NetworkId, prices: PriceSettings) -> CreditKeeper:
        return CreditBook(store.engine, PriceTable(prices), network_id)

    return peer_service(tmp_path, name, list(engines), member=False, keepers=keepers)


async def test_a_node_in_two_networks_keeps_them_apart(
    tmp_path: Path, engine: LlamaCppEngine, services: list[PeerService]
) -> None:
    first = host_network(tmp_path, "hub", "first", "private")
    second = host_network(tmp_path, "hub", "second", "private")
    stores: list[Store] = []
    try:
        hub = await start_service(services, await _paid(tmp_path, "hub", [], stores))
        p1 = await start_service(services, await _paid(tmp_path, "p1", [engine], stores))
        p2 = await start_service(services, await _paid(tmp_path, "p2", [engine], stores))
        await p1.join(_address(hub), await _invite(tmp_path, hub, first))
        await p2.join(_address(hub), await _invite(tmp_path, hub, second))
        await p1.connect(_address(hub))
        await p2.connect(_address(hub))
        await wait_for(lambda: len(hub.connected()) == 2, what="both peers linked")
        model = engine.models()[0].name
        for peer, network, other in ((p1, first, second), (p2, second, first)):
            assert set(hub.session(peer.peer_id, NetworkId(network.network_id)).networks) == {
                network.network_id
            }
            with pytest.raises(FederationError, match="not in network"):
                await hub.complete(peer.peer_id, _request(model, other.network_id))
        for index in range(200):
            peer, network = (p1, first) if index % 2 == 0 else (p2, second)
            await hub.complete(peer.peer_id, _request(model, network.network_id))
        # A request of the first network forced onto p2's link is refused by p2 before any work.
        stream = hub.session(p2.peer_id, NetworkId(second.network_id)).link.open_stream()
        stream.send(InferenceMessage(request=_request(model, first.network_id)))
        answer = await stream.receive(5.0)
        assert isinstance(answer, ErrorMessage) and answer.code == "not_a_member"
        for settler in hub.networks.settlers():
            await settler.drain()
        await asyncio.sleep(1.0)  # peer exchange rounds and receipt gossip settle
        assert p2.peer_id not in {record.peer_id for record in p1.registry.records()}
        assert p1.peer_id not in {record.peer_id for record in p2.registry.records()}
        for peer, store, own, other in ((p1, stores[1], first, second), (p2, stores[2], second, first)):
            async with store.engine.connect() as connection:
                counts = dict(
                    (
                        await connection.execute(
                            select(ReceiptRow.network_id, func.count()).group_by(ReceiptRow.network_id)
                        )
                    ).all()
                )
            assert counts.get(own.network_id) == 100 and other.network_id not in counts, counts
            assert peer.networks.held.get(other.network_id) is None
    finally:
        for store in stores:
            await store.close()


async def test_the_cli_joins_lists_and_leaves(tmp_path: Path, services: list[PeerService]) -> None:
    network = host_network(tmp_path, "authority", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    data_dir = tmp_path / "cli"

    def cli(*args: str) -> Any:
        return CliRunner().invoke(
            app, ["network", *args, "--data-dir", str(data_dir)], env={"COLUMNS": "200"}
        )

    joined = await asyncio.to_thread(
        cli, "join", "--bootstrap", _address(authority), "--network", network.network_id
    )
    assert joined.exit_code == 1 and "takes an invite" in joined.output  # private: no public join
    # The authority names its address in the description, so its invites carry it.
    placed = next_description(authority.identity, network, bootstrap=[_address(authority)])
    token = await _invite(tmp_path, authority, placed, max_uses=1)
    assert token.bootstrap == (_address(authority),)
    joined = await asyncio.to_thread(cli, "join", token.to_url())
    assert joined.exit_code == 0 and "joined lab" in joined.output, joined.output
    assert len(await _members(authority, network.network_id)) == 1
    replay = await asyncio.to_thread(cli, "join", token.to_text())  # the same account: its membership back
    assert replay.exit_code == 0 and len(await _members(authority, network.network_id)) == 1
    late = await asyncio.to_thread(
        CliRunner().invoke, app, ["network", "join", token.to_text(), "--data-dir", str(tmp_path / "late")]
    )
    assert late.exit_code == 1 and "used 1 times" in late.output
    listed = await asyncio.to_thread(cli, "joined", "--json")
    assert listed.exit_code == 0 and network.network_id in listed.output
    left = await asyncio.to_thread(cli, "leave", "lab")
    assert left.exit_code == 0, left.output
    assert network.network_id not in (await asyncio.to_thread(cli, "joined", "--json")).output


async def test_a_running_node_takes_up_a_network_the_cli_joined_within_a_second(
    tmp_path: Path, services: list[PeerService]
) -> None:
    # The member's heartbeat is a minute apart: only its watch of the data directory can notice.
    network = host_network(tmp_path, "authority", "lab", "private")
    authority = await start_service(services, peer_service(tmp_path, "authority", member=False))
    placed = next_description(authority.identity, network, bootstrap=[_address(authority)])
    member = await start_service(
        services, peer_service(tmp_path, "member", member=False, heartbeat_interval_s=60.0)
    )
    # The authority's own watch takes up the new description (its address) it will send joiners.
    await wait_for(
        lambda: authority.networks.held.get(network.network_id).description == placed.description,  # type: ignore[union-attr]
        timeout_s=2.0,
        what="the authority's new description",
    )
    token = await _invite(tmp_path, authority, placed, max_uses=1)
    data_dir = member._settings.resolved_data_dir
    started = time.monotonic()
    joined = await asyncio.to_thread(
        CliRunner().invoke, app, ["network", "join", token.to_text(), "--data-dir", str(data_dir)]
    )
    assert joined.exit_code == 0, joined.output
    await wait_for(
        lambda: member.networks.held.get(network.network_id) is not None,
        timeout_s=2.0,
        what="the network held",
    )
    member.networks.terms(NetworkId(network.network_id))  # its terms are open once it is held
    await wait_for(lambda: authority.peer_id in member.connected(), timeout_s=5.0, what="the link")
    session = member._sessions.routed(authority.peer_id)
    assert session is not None and network.network_id in session.networks
    assert time.monotonic() - started < 10.0
