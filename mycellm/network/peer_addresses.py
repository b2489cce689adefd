"""Signed peer addresses: each node signs where it listens; a record heard is checked, an address learned kept only if allowed.

A record says "the device of this certificate listens at this address, as of this time"; it is
signed by that device and carries its certificate, so any node can check it whoever relayed it,
and a relay can pass it on only verbatim. Learned addresses are hints: only literal IPs in the
ranges the config allows are kept or dialed (loopback, private, link-local and reserved ranges
need a setting), so peers cannot point a node at its own network or at names they control.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ConfigDict, Field

from mycellm.config import NodeSettings, split_address
from mycellm.errors import IdentityError
from mycellm.identity.canonical import CanonicalModel
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.network.messages import MAX_ADDRESS_RECORD_BYTES, PeerAddress
from mycellm.types import PeerId

ADDRESS_RECORD_VERSION = 1


# Prefixed to what the device key signs, so a signed address is never the bytes of a hello.
ADDRESS_DOMAIN = b"mycellm/peer-address\x00"


ADDRESS_MAX_AGE_S = 24 * 3600  # older records are dropped (their node re-signs hourly)


ADDRESS_CLOCK_SKEW_S = 300  # records dated further ahead are dropped


RESIGN_AFTER_S = 3600  # a node signs its address again once its record is this old


Verdict = Literal["kept", "known", "refused", "stale", "revoked", "full", "forged"]


class AddressRecord(CanonicalModel):
    """A device's signed statement of where it listens (canonical CBOR)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = ADDRESS_RECORD_VERSION
    peer_id: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    address: Annotated[str, Field(min_length=3, max_length=300)]
    signed_at: Annotated[int, Field(ge=0, le=2**40)]
    certificate: Annotated[bytes, Field(max_length=1024)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    def signed_payload(self) -> bytes:
        return ADDRESS_DOMAIN + cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)


def sign_address(identity: NodeIdentity, address: str, now: float | None = None) -> AddressRecord:
    """This node's record of ``address``, signed now with its device key."""
    unsigned = AddressRecord(
        peer_id=identity.peer_id,
        address=address,
        signed_at=int(time.time() if now is None else now),
        certificate=identity.certificate.to_bytes(),
        signature=bytes(64),
    )
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.signed_payload())})


class OwnAddress:
    """This node's signed address record, signed again when the address changes or the record ages.

    ``address`` says where the node listens now (None while it does not know).
    """

    def __init__(self, identity: NodeIdentity, address: Callable[[], str | None]) -> None:
        self._identity = identity
        self.address = address
        self.peer_id = PeerId(identity.peer_id)
        self._record: AddressRecord | None = None

    def entry(self, now: float | None = None) -> PeerAddress | None:
        """The record of the node's address as a peer list entry; None while it has no address."""
        address = self.address()
        if address is None:
            return None
        now = time.time() if now is None else now
        record = self._record
        if record is None or record.address != address or now - record.signed_at >= RESIGN_AFTER_S:
            record = self._record = sign_address(self._identity, address, now)
        return PeerAddress(peer_id=PeerId(record.peer_id), record=record.to_bytes())


@dataclass(frozen=True, slots=True)
class HeardAddress:
    """A peer's address record as heard: parsed and matched to its peer id, signatures not yet checked."""

    record: AddressRecord
    certificate: DeviceCertificate
    raw: bytes

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    @property
    def address(self) -> str:
        return self.record.address

    @property
    def signed_at(self) -> int:
        return self.record.signed_at

    def fresh(self, now: float) -> bool:
        """Signed within the last day, not ahead of the clock beyond the skew, certificate unexpired."""
        return (
            now - ADDRESS_MAX_AGE_S <= self.signed_at <= now + ADDRESS_CLOCK_SKEW_S
            and now < self.certificate.expires_at
        )

    def verify(self, now: float) -> Verdict:
        """Check both signatures and the certificate's time span: "kept" if all hold."""
        try:
            self.certificate.verify_signature()
            Ed25519PublicKey.from_public_bytes(self.certificate.device_public_key).verify(
                self.record.signature, self.record.signed_payload()
            )
        except (IdentityError, InvalidSignature, ValueError):
            return "forged"
        try:
            self.certificate.verify(now, ADDRESS_CLOCK_SKEW_S, signature_checked=True)
        except IdentityError:
            return "stale"
        return "kept"


def read_address(entry: PeerAddress) -> HeardAddress:
    """Parse a peer list entry; IdentityError if it is malformed or its peer ids disagree (a forgery).

    Cheap: no signature is checked here (``HeardAddress.verify`` does that).
    """
    record = AddressRecord.parse_canonical(
        entry.record,
        what="address record",
        max_bytes=MAX_ADDRESS_RECORD_BYTES,
        version=ADDRESS_RECORD_VERSION,
    )
    certificate = DeviceCertificate.from_bytes(record.certificate)
    if not entry.peer_id == record.peer_id == certificate.peer_id:
        raise IdentityError("address record names another peer than its certificate")
    return HeardAddress(record=record, certificate=certificate, raw=entry.record)


# Ranges a learned address may be in when ``allow_private_peer_addresses`` is set.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(cidr)
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def literal_ip(address: str) -> IPAddress | None:
    """The IP of ``host:port`` if the host is a literal IP (an IPv4-mapped IPv6 one as IPv4), else None."""
    try:
        host, _ = split_address(address)
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_group(address: str) -> str:
    """The group an address counts in: its /16 for IPv4, its /32 for IPv6 (one operator's block)."""
    ip = literal_ip(address)
    if ip is None:
        return address
    prefix = 16 if ip.version == 4 else 32
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class AddressPolicy:
    """Which learned addresses a node keeps and dials: literal public IPs, and the ranges allowed."""

    def __init__(self, allow_private: bool = False, allowed_networks: tuple[str, ...] = ()) -> None:
        self._allow_private = allow_private
        self._allowed = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allowed_networks)

    @classmethod
    def of(cls, settings: NodeSettings) -> AddressPolicy:
        return cls(settings.allow_private_peer_addresses, settings.allowed_peer_networks)

    def allows(self, address: str) -> bool:
        ip = literal_ip(address)
        if ip is None or ip.is_unspecified or ip.is_multicast:
            return False  # host names are not hints: whoever names them would choose what we dial
        if any(ip.version == network.version and ip in network for network in self._allowed):
            return True
        if ip.is_global:
            return True
        return self._allow_private and any(
            ip.version == network.version and ip in network for network in PRIVATE_NETWORKS
        )
