"""Helpers for peer-link tests: PeerServices on loopback, and TLS certificates crafted to be refused."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from mycellm.config import NodeSettings, PriceSettings
from mycellm.engines.protocol import InferenceEngine
from mycellm.federation.authority import HostedNetwork, create_network, hosted_networks, invite
from mycellm.federation.descriptions import JoinPolicy, NetworkDescription, NetworkPrices, Visibility
from mycellm.federation.held import HeldNetworks
from mycellm.federation.invites import InviteToken
from mycellm.federation.memberships import MembershipCertificate, issue_membership
from mycellm.identity.keys import load_or_create_identity
from mycellm.ledger.memberships import MembershipBook
from mycellm.ledger.store import Store
from mycellm.network.messages import ALPN
from mycellm.network.network_links import KeeperFactory
from mycellm.network.service import PeerService
from mycellm.network.serving import EngineServer
from mycellm.network.settlement import CreditKeeper
from mycellm.network.tls import DEVICE_CERTIFICATE_OID
from mycellm.types import NetworkId

TEST_NETWORK = "test"


def shared_network(root: Path, prices: PriceSettings | None = None) -> NetworkDescription:
    """The private network of one test: its authority lives in ``root/authority`` (made on first use)."""
    data_dir = root / "authority"
    authority = load_or_create_identity(data_dir, node_name="authority")
    held = [network for network in hosted_networks(data_dir) if network.name == TEST_NETWORK]
    if held:
        return held[0].description
    return create_network(
        data_dir,
        authority,
        name=TEST_NETWORK,
        visibility="private",
        default=False,
        bootstrap=(),
        prices=NetworkPrices.from_settings(prices or PriceSettings()),
        model_tiers={},
    ).description


def admit(root: Path, data_dir: Path, description: NetworkDescription, role: str = "seeder") -> None:
    """Make the node of ``data_dir`` a member of the test network, as a redeemed invite would."""
    authority = load_or_create_identity(root / "authority", node_name="authority")
    member = load_or_create_identity(data_dir, node_name=data_dir.name)
    assert authority.account_key is not None
    membership = issue_membership(
        authority.account_key,
        description,
        member.certificate.account_public_key,
        role=role,  # type: ignore[arg-type]
    )
    HeldNetworks(data_dir, member).store_joined(description, membership, None)


def peer_service(
    root: Path,
    name: str,
    engines: list[InferenceEngine] | None = None,
    keeper: CreditKeeper | None = None,
    *,
    member: bool = True,
    keepers: KeeperFactory | None = None,
    **settings: object,
) -> PeerService:
    """A PeerService on loopback; ``member``: in the test's shared network (made on first use).

    ``keeper``, if given, keeps the credits of the shared network (a CreditBook of its id);
    ``keepers`` opens the books of each network instead.
    """
    values: dict[str, object] = {
        "node_name": name,
        "data_dir": root / name,
        "host": "127.0.0.1",
        "quic_port": 0,
        "models": (),
        "heartbeat_interval_s": 0.2,
        "reconnect_max_backoff_s": 0.5,
        "peer_exchange_interval_s": 0.5,
        "allowed_peer_networks": ("127.0.0.0/8",),  # every test node listens on loopback
    }
    values.update(settings)
    node = NodeSettings(**values)  # type: ignore[arg-type]
    identity = load_or_create_identity(node.resolved_data_dir, node_name=name)
    if member:
        admit(root, node.resolved_data_dir, shared_network(root, node.credits))

    async def shared(network_id: NetworkId, prices: PriceSettings) -> CreditKeeper:
        assert keeper is not None
        return keeper

    return PeerService(
        node,
        identity,
        EngineServer(list(engines or [])),
        keepers=keepers or (None if keeper is None else shared),
    )


async def wait_for(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def crafted_certificate(key: Ed25519PrivateKey, device_certificate: bytes | None) -> x509.Certificate:
    """A self-signed certificate for ``key``, carrying ``device_certificate`` bytes if given."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if device_certificate is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(DEVICE_CERTIFICATE_OID, device_certificate), critical=False
        )
    return builder.sign(key, algorithm=None)


async def refusal_reason(
    port: int, certificate: x509.Certificate | None, key: Ed25519PrivateKey | None
) -> str:
    """Connect with a raw aioquic client presenting ``certificate``; the server's close reason."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    if certificate is not None:
        configuration.certificate = certificate
        configuration.private_key = key
    async with connect("127.0.0.1", port, configuration=configuration) as protocol:
        client: QuicConnectionProtocol = protocol
        await asyncio.wait_for(client.wait_closed(), timeout=5.0)
        event = client._quic._close_event
        assert event is not None
        return event.reason_phrase


def host_network(
    root: Path, name: str, network: str, visibility: Visibility = "private", policy: JoinPolicy | None = None
) -> HostedNetwork:
    """A network hosted by the account of the node ``root/name`` (its identity made on first use)."""
    identity = load_or_create_identity(root / name, node_name=name)
    return create_network(
        root / name,
        identity,
        name=network,
        visibility=visibility,
        default=False,
        bootstrap=(),
        prices=NetworkPrices.from_settings(PriceSettings()),
        model_tiers={},
        join_policy=policy,
    )


async def start_service(started: list[PeerService], service: PeerService) -> PeerService:
    """Start ``service`` and keep it in ``started`` (the ``services`` fixture stops them all)."""
    await service.start()
    started.append(service)
    return service


async def authority_books(authority: PeerService) -> tuple[Store, MembershipBook]:
    """The authority node's books (the caller closes the store)."""
    store = await Store.open(authority._settings.resolved_database_url)
    return store, MembershipBook(store.engine)


async def recorded_invite(authority: PeerService, network: HostedNetwork, **terms: object) -> InviteToken:
    """Sign an invite and keep it in the authority's books, as ``mycellm network invite`` does."""
    token = invite(authority.identity, network, **terms)  # type: ignore[arg-type]
    store, book = await authority_books(authority)
    try:
        await book.record_invite(
            token.network_id, token.nonce, token.role, token.max_uses, token.expires_at, token.bind_key
        )
    finally:
        await store.close()
    return token


async def admitted_for(
    root: Path,
    authority: PeerService,
    network: HostedNetwork,
    name: str,
    *,
    validity_s: int,
    role: str = "seeder",
) -> MembershipCertificate:
    """Make the node of ``root/name`` a member for ``validity_s`` seconds only: an invite redeemed in
    the authority's books with a certificate of that span, kept in the node's data directory."""
    token = await recorded_invite(authority, network, role=role, max_uses=1)
    member = load_or_create_identity(root / name, node_name=name)
    assert authority.identity.account_key is not None
    certificate = issue_membership(
        authority.identity.account_key,
        network.description,
        member.certificate.account_public_key,
        role=role,  # type: ignore[arg-type]
        validity_s=validity_s,
    )
    store, book = await authority_books(authority)
    try:
        await book.redeem(
            network.network_id,
            token.nonce,
            member.account_id,
            time.time(),
            lambda: (certificate.to_bytes(), float(certificate.expires_at)),
        )
    finally:
        await store.close()
    HeldNetworks(root / name, member).store_joined(network.description, certificate, network.revocations)
    return certificate
