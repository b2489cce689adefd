"""Signed lists of member accounts a network's authority revoked, and the book of the newest per network."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from itertools import pairwise
from typing import Annotated

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ConfigDict, Field, field_validator

from mycellm.errors import FederationError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.network_ids import NetworkIdText
from mycellm.federation.signed import (
    Signature,
    Timestamp,
    build_signed,
    check_signature,
    decode_book,
    parse_signed,
    whole_seconds,
)
from mycellm.identity.canonical import CanonicalModel
from mycellm.identity.certificates import RawPublicKey, raw_public_key

MEMBER_REVOCATIONS_VERSION = 1

MAX_REVOKED_MEMBERS = 1024

MEMBER_REVOCATIONS_MAX_BYTES = 65536

MEMBER_REVOCATION_BOOK_MAX_NETWORKS = 256

MEMBER_REVOCATION_BOOK_MAX_BYTES = 16 * 1024 * 1024


class MemberRevocationList(CanonicalModel):
    """A network authority's signed, numbered list of the member accounts it no longer admits."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = MEMBER_REVOCATIONS_VERSION
    network_id: NetworkIdText
    authority_public_key: RawPublicKey
    serial: Annotated[int, Field(ge=0, lt=2**63)]
    issued_at: Timestamp
    revoked: Annotated[tuple[RawPublicKey, ...], Field(max_length=MAX_REVOKED_MEMBERS)]
    signature: Signature

    @field_validator("revoked")
    @classmethod
    def _check_sorted_and_unique(cls, revoked: tuple[bytes, ...]) -> tuple[bytes, ...]:
        # One order only, so that one set of keys has one signed encoding and lookups can bisect.
        if any(later <= earlier for earlier, later in pairwise(revoked)):
            raise ValueError("revoked member keys must be sorted and without duplicates")
        return revoked

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberRevocationList:
        """Parse a list; checks the size cap before decoding. Does not verify the signature."""
        return parse_signed(
            cls,
            data,
            what="member revocation list",
            max_bytes=MEMBER_REVOCATIONS_MAX_BYTES,
            version=MEMBER_REVOCATIONS_VERSION,
            tuples=("revoked",),
        )

    def verify(self, description: NetworkDescription) -> None:
        """Check it is ``description``'s network's list, signed by that network's authority."""
        if self.network_id != description.network_id:
            raise FederationError(
                f"member revocations are for network {self.network_id}, not {description.network_id}",
                code="wrong_network",
            )
        if self.authority_public_key != description.authority_public_key:
            raise FederationError("member revocations name another authority key", code="bad_signature")
        check_signature(self, self.authority_public_key, what="member revocation list")

    def is_revoked(self, account_public_key: bytes) -> bool:
        """Whether this list revokes the member account ``account_public_key`` (raw 32 bytes)."""
        index = bisect.bisect_left(self.revoked, account_public_key)
        return index < len(self.revoked) and self.revoked[index] == account_public_key


def issue_member_revocations(
    authority_key: Ed25519PrivateKey,
    description: NetworkDescription,
    revoked: Iterable[bytes],
    *,
    serial: int,
    now: float | None = None,
) -> MemberRevocationList:
    """Sign ``description``'s network's list revoking ``revoked`` (any order, repeats dropped) as ``serial``."""
    public_key = raw_public_key(authority_key)
    if public_key != description.authority_public_key:
        raise FederationError("only the network's authority key revokes its members", code="bad_signature")
    fields = {
        "version": MEMBER_REVOCATIONS_VERSION,
        "network_id": description.network_id,
        "authority_public_key": public_key,
        "serial": serial,
        "issued_at": whole_seconds(now),
        "revoked": tuple(sorted(set(revoked))),
    }
    return build_signed(
        MemberRevocationList,
        authority_key,
        fields,
        what="member revocation list",
        max_bytes=MEMBER_REVOCATIONS_MAX_BYTES,
    )


class MemberRevocationBook:
    """The newest verified member revocation list of each network (bounded; persisted by the caller)."""

    def __init__(self, *, max_networks: int = MEMBER_REVOCATION_BOOK_MAX_NETWORKS) -> None:
        self.max_networks = max_networks
        self._lists: dict[str, MemberRevocationList] = {}

    def accept(self, revocations: MemberRevocationList, description: NetworkDescription) -> bool:
        """Store a list verified against its network's description if newer than the one held.

        True if stored; False for an older or equal serial. A new network beyond ``max_networks``
        is refused (FederationError ``full``): the lists already held stay in force.
        """
        description.verify()
        revocations.verify(description)
        held = self._lists.get(revocations.network_id)
        if held is not None and revocations.serial <= held.serial:
            return False
        if held is None and len(self._lists) >= self.max_networks:
            raise FederationError(f"member revocation book holds {self.max_networks} networks", code="full")
        self._lists[revocations.network_id] = revocations
        return True

    def is_revoked(self, network_id: str, account_public_key: bytes) -> bool:
        """Whether the newest list held for ``network_id`` revokes the member account."""
        revocations = self._lists.get(network_id)
        return revocations is not None and revocations.is_revoked(account_public_key)

    def lists(self) -> list[MemberRevocationList]:
        """The lists held, one per network, ordered by network id."""
        return [self._lists[network_id] for network_id in sorted(self._lists)]

    def to_bytes(self) -> bytes:
        """A canonical CBOR array of each list's own encoding."""
        return cbor2.dumps([revocations.to_bytes() for revocations in self.lists()], canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes, descriptions: Iterable[NetworkDescription]) -> MemberRevocationBook:
        """Parse a book and re-verify each list against its network's description; FederationError if not."""
        by_network = {description.network_id: description for description in descriptions}
        book = cls()
        for index, item in enumerate(
            decode_book("member revocation book", data, MEMBER_REVOCATION_BOOK_MAX_BYTES)
        ):
            try:
                revocations = MemberRevocationList.from_bytes(item)
                description = by_network.get(revocations.network_id)
                if description is None:
                    raise FederationError(
                        f"no description of network {revocations.network_id}", code="wrong_network"
                    )
                if revocations.network_id in book._lists:
                    raise FederationError(
                        f"a second list for network {revocations.network_id}", code="malformed"
                    )
                book.accept(revocations, description)
            except FederationError as error:
                raise FederationError(
                    f"member revocation book entry {index}: {error.message}", code=error.code
                ) from error
        return book
