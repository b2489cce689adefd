"""What ``bench/hostile_peer.py`` gossips: sybil devices, peer lists pointing nowhere, revocation lists."""

from __future__ import annotations

import os
import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.identity.certificates import issue_device_certificate, raw_public_key
from mycellm.identity.keys import NodeIdentity
from mycellm.identity.revocations import issue_revocation_list
from mycellm.network import messages as wire
from mycellm.network.peer_addresses import sign_address
from mycellm.types import PeerId


def sybil() -> NodeIdentity:
    """A device of a fresh account, in memory only (it signs address records, never links)."""
    account, device = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    certificate = issue_device_certificate(account, raw_public_key(device), name="sybil")
    return NodeIdentity(account_key=account, device_key=device, certificate=certificate)


def bogus_peers(sybils: list[NodeIdentity]) -> tuple[wire.PeerAddress, ...]:
    """A peer list pointing nowhere: address records signed by sybils, and last a forged one."""
    entries = []
    for sybil in random.sample(sybils, 8):
        port = random.randint(1, 19)
        address = random.choice((f"192.0.2.{port}:8421", f"127.0.0.1:{port}"))
        entries.append(
            wire.PeerAddress(peer_id=PeerId(sybil.peer_id), record=sign_address(sybil, address).to_bytes())
        )
    return (*entries, wire.PeerAddress(peer_id=PeerId(os.urandom(32).hex()), record=os.urandom(200)))


def revocation(garbled: bool = False) -> bytes:
    """A valid revocation list of a fresh account (kept by the node, up to its book's cap); garbled:
    its signature broken."""
    data = bytearray(
        issue_revocation_list(Ed25519PrivateKey.generate(), [os.urandom(32)], serial=1).to_bytes()
    )
    data[-1] ^= 0xFF if garbled else 0
    return bytes(data)
