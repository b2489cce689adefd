"""The membership check of a link: the networks a peer's device and this node share, proven by signed memberships."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from mycellm.errors import FederationError, IdentityError
from mycellm.federation.held import HeldNetwork, HeldNetworks
from mycellm.federation.memberships import MembershipCertificate, check_member
from mycellm.identity.certificates import DeviceCertificate
from mycellm.types import NetworkId

# At most this many memberships are looked at in one hello (the message caps the count as well).
MAX_MEMBERSHIPS_PER_HELLO = 32

# What a link proves in each network it shares: the membership the peer presented, or None for a
# device of the network's own authority account (it needs no certificate to be a member).
SharedNetworks = Mapping[NetworkId, MembershipCertificate | None]


class NotAMemberError(FederationError):
    """The peer proved membership in none of this node's networks (or not in the one a request names)."""

    code = "not_a_member"


def _is_authority_device(network: HeldNetwork, device: DeviceCertificate) -> bool:
    return device.account_public_key == network.description.authority_public_key


class MembershipGate:
    """Checks what a peer presents against the networks this node holds, at link set-up and again later."""

    def __init__(self, held: HeldNetworks) -> None:
        self._held = held

    def shared(
        self, presented: Iterable[bytes], device: DeviceCertificate, now: float | None = None
    ) -> dict[NetworkId, MembershipCertificate | None]:
        """The networks held here in which ``device``'s account is a current member.

        A membership for a network this node is not in is ignored (it proves nothing here); one that
        is malformed, forged, expired, another account's or revoked counts for nothing. Raises
        NotAMemberError (naming the last reason) when no network is shared: the link is refused.
        """
        now = time.time() if now is None else now
        try:
            device.verify(now)
        except IdentityError as error:
            raise NotAMemberError(f"device certificate refused: {error.message}") from error
        shared: dict[NetworkId, MembershipCertificate | None] = {}
        reason = "it presented no membership of a network this node is in"
        for data in list(presented)[:MAX_MEMBERSHIPS_PER_HELLO]:
            try:
                certificate = MembershipCertificate.from_bytes(data)
                network = self._held.get(certificate.network_id)
                if network is None:
                    continue
                # The device was verified above, the description when it was loaded.
                self._check(certificate, device, network, now, verified=True)
            except FederationError as error:
                reason = error.message
                continue
            shared[network.network_id] = certificate
        for network in self._held.networks():
            if (
                network.network_id not in shared
                and _is_authority_device(network, device)
                and not _revoked(network, device.account_public_key)
            ):
                shared[network.network_id] = None
        if not shared:
            raise NotAMemberError(
                f"device {device.peer_id[:12]} is not a member of this node's networks: {reason}"
            )
        return shared

    def still_shared(
        self, shared: SharedNetworks, device: DeviceCertificate, now: float | None = None
    ) -> dict[NetworkId, MembershipCertificate | None]:
        """The part of ``shared`` that still holds now (memberships expire, members are revoked, a node
        leaves a network); possibly empty."""
        now = time.time() if now is None else now
        kept: dict[NetworkId, MembershipCertificate | None] = {}
        for network_id, certificate in shared.items():
            network = self._held.get(network_id)
            if network is None:
                continue
            try:
                if certificate is None:
                    if not _is_authority_device(network, device) or _revoked(
                        network, device.account_public_key
                    ):
                        continue
                else:
                    self._check(certificate, device, network, now)
            except FederationError:
                continue
            kept[network_id] = certificate
        return kept

    @staticmethod
    def _check(
        certificate: MembershipCertificate,
        device: DeviceCertificate,
        network: HeldNetwork,
        now: float,
        verified: bool = False,
    ) -> None:
        check_member(certificate, device, network.description, now, verified=verified)
        if _revoked(network, certificate.member_account_public_key):
            raise FederationError(
                f"member {certificate.member_account_id[:12]} is revoked from {network.name}", code="revoked"
            )


def _revoked(network: HeldNetwork, account_public_key: bytes) -> bool:
    return network.revocations is not None and network.revocations.is_revoked(account_public_key)
