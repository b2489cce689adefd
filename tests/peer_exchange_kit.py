"""Signed peer address records and hint tables for the peer-exchange tests."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.identity.certificates import issue_device_certificate, raw_public_key
from mycellm.identity.keys import NodeIdentity
from mycellm.network.messages import PeerAddress
from mycellm.network.peer_addresses import (
    AddressPolicy,
    AddressRecord,
    sign_address,
)
from mycellm.network.peer_hints import HintLimits, PeerHints
from mycellm.network.service import PeerService
from mycellm.network.session import Session
from mycellm.types import PeerId
from tests.peer_kit import peer_service, start_service, wait_for


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
