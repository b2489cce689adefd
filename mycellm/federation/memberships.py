"""Membership certificates: a network's authority admits a member account, for a role and a time span."""

from __future__ import annotations

import hashlib
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ConfigDict, Field

from mycellm.errors import FederationError, IdentityError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.member_revocations import MemberRevocationBook
from mycellm.federation.network_ids import NetworkIdText
from mycellm.federation.signed import (
    DEFAULT_CLOCK_SKEW_S,
    MemberRole,
    Signature,
    Timestamp,
    build_signed,
    check_signature,
    check_window,
    parse_signed,
    whole_seconds,
)
from mycellm.identity.canonical import CanonicalModel
from mycellm.identity.certificates import DeviceCertificate, RawPublicKey, raw_public_key

MEMBERSHIP_VERSION = 1

MEMBERSHIP_MAX_BYTES = 1024

DEFAULT_MEMBERSHIP_VALIDITY_S = 30 * 86400

Authority = NetworkDescription | tuple[bytes, str]


def _authority_of(authority: Authority) -> tuple[bytes, str]:
    """The authority key and network id a value must be signed by and name."""
    if isinstance(authority, NetworkDescription):
        return authority.authority_public_key, authority.network_id
    return authority


class MembershipCertificate(CanonicalModel):
    """A network authority's statement that an account is a member, in a role, from issued to expires."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = MEMBERSHIP_VERSION
    network_id: NetworkIdText
    member_account_public_key: RawPublicKey
    role: MemberRole
    issued_at: Timestamp
    expires_at: Timestamp
    serial: Annotated[int, Field(ge=0, lt=2**63)]  # renewals count up, so the newest is known
    signature: Signature

    @classmethod
    def from_bytes(cls, data: bytes) -> MembershipCertificate:
        """Parse a membership; checks the size cap before decoding. Does not verify the signature."""
        return parse_signed(
            cls,
            data,
            what="membership certificate",
            max_bytes=MEMBERSHIP_MAX_BYTES,
            version=MEMBERSHIP_VERSION,
        )

    def verify(
        self, authority: Authority, now: float | None = None, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
    ) -> None:
        """Check it names the network, is signed by its authority and is valid at ``now``.

        ``authority`` is the network's verified description, or its (authority key, network id).
        Raises FederationError: ``wrong_network``, ``bad_signature``, ``not_yet_valid``, ``expired``.
        """
        authority_key, network_id = _authority_of(authority)
        if self.network_id != network_id:
            raise FederationError(
                f"membership is for network {self.network_id}, not {network_id}", code="wrong_network"
            )
        check_signature(self, authority_key, what="membership certificate")
        check_window("membership certificate", self.issued_at, self.expires_at, now, clock_skew_s)

    def renew(
        self,
        authority_key: Ed25519PrivateKey,
        description: NetworkDescription,
        *,
        validity_s: int = DEFAULT_MEMBERSHIP_VALIDITY_S,
        now: float | None = None,
    ) -> MembershipCertificate:
        """This membership renewed: see ``renew_membership``."""
        return renew_membership(authority_key, description, self, validity_s=validity_s, now=now)

    @property
    def member_account_id(self) -> str:
        return hashlib.sha256(self.member_account_public_key).hexdigest()


def issue_membership(
    authority_key: Ed25519PrivateKey,
    description: NetworkDescription,
    member_account_public_key: bytes,
    *,
    role: MemberRole = "consumer",
    validity_s: int = DEFAULT_MEMBERSHIP_VALIDITY_S,
    serial: int = 0,
    now: float | None = None,
) -> MembershipCertificate:
    """Sign a membership of ``description``'s network for the member account, from now for validity_s."""
    if raw_public_key(authority_key) != description.authority_public_key:
        raise FederationError("only the network's authority key issues its memberships", code="bad_signature")
    if validity_s <= 0:
        raise FederationError(f"membership validity must be positive, not {validity_s} s", code="malformed")
    issued_at = whole_seconds(now)
    fields = {
        "version": MEMBERSHIP_VERSION,
        "network_id": description.network_id,
        "member_account_public_key": member_account_public_key,
        "role": role,
        "issued_at": issued_at,
        "expires_at": issued_at + validity_s,
        "serial": serial,
    }
    return build_signed(
        MembershipCertificate,
        authority_key,
        fields,
        what="membership certificate",
        max_bytes=MEMBERSHIP_MAX_BYTES,
    )


def renew_membership(
    authority_key: Ed25519PrivateKey,
    description: NetworkDescription,
    certificate: MembershipCertificate,
    *,
    validity_s: int = DEFAULT_MEMBERSHIP_VALIDITY_S,
    now: float | None = None,
) -> MembershipCertificate:
    """A new certificate for the same member and role, with the next serial and a later expiry.

    The old certificate need not be valid still (a lapsed member may be renewed), but it must be
    this network's, signed by its authority.
    """
    certificate.verify(description, now=certificate.issued_at)
    renewed = issue_membership(
        authority_key,
        description,
        certificate.member_account_public_key,
        role=certificate.role,
        validity_s=validity_s,
        serial=certificate.serial + 1,
        now=now,
    )
    if renewed.expires_at <= certificate.expires_at:
        raise FederationError(
            f"a renewal must expire after {certificate.expires_at}, not at {renewed.expires_at}",
            code="malformed",
        )
    return renewed


def check_member(
    certificate: MembershipCertificate,
    device_certificate: DeviceCertificate,
    description: NetworkDescription,
    now: float | None = None,
    *,
    revocations: MemberRevocationBook | None = None,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    verified: bool = False,
) -> None:
    """Check that the device belongs to a current member of ``description``'s network.

    The description is verified; the membership must be its network's, signed by its authority and
    valid at ``now``; the device certificate must verify and be valid at ``now``, and its account
    key must be the member key; the member must not be revoked in ``revocations``. Raises
    FederationError (``wrong_member`` when the device is another account's). ``verified``: the
    caller verified the description (when it loaded it) and the device certificate (at ``now``)
    already, so only the membership's own signature is checked here.
    """
    if not verified:
        description.verify()
    certificate.verify(description, now, clock_skew_s)
    try:
        if not verified:
            device_certificate.verify(now, clock_skew_s)
    except IdentityError as error:
        raise FederationError(f"device certificate refused: {error.message}", code="wrong_member") from error
    if device_certificate.account_public_key != certificate.member_account_public_key:
        raise FederationError(
            f"device {device_certificate.peer_id} belongs to account {device_certificate.account_id},"
            f" not to member {certificate.member_account_id}",
            code="wrong_member",
        )
    if revocations is not None and revocations.is_revoked(
        certificate.network_id, certificate.member_account_public_key
    ):
        raise FederationError(
            f"member {certificate.member_account_id} is revoked from network {certificate.network_id}",
            code="revoked",
        )
