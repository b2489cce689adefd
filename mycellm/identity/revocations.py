"""Signed lists of revoked devices, one per account, and the book of the newest list of each."""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Iterable
from itertools import pairwise
from typing import Annotated

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ConfigDict, Field, ValidationError, field_validator

from mycellm.errors import IdentityError
from mycellm.identity.canonical import CanonicalModel, decode_cbor, describe_validation_error
from mycellm.identity.certificates import (
    DeviceCertificate,
    RawPublicKey,
    raw_public_key,
)

REVOCATION_LIST_VERSION = 1


REVOCATION_LIST_MAX_BYTES = 65536


REVOCATION_BOOK_MAX_BYTES = 16 * 1024 * 1024


# What a book holds of peers' lists: a list that would take it past this is refused (the lists held
# stay enforced). The node's own account's list is always kept, so a stored book stays within
# REVOCATION_BOOK_MAX_BYTES and always reads back.
REVOCATION_BOOK_KEEP_BYTES = REVOCATION_BOOK_MAX_BYTES - REVOCATION_LIST_MAX_BYTES - 16


_ITEM_HEADER_BYTES = 3  # a list's byte-string header in the stored array (lists are under 64 KiB)


class RevocationList(CanonicalModel):
    """An account key's signed, numbered list of the device keys it no longer vouches for."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = REVOCATION_LIST_VERSION
    account_public_key: RawPublicKey
    serial: Annotated[int, Field(ge=0)]
    issued_at: Annotated[int, Field(ge=0)]
    revoked: tuple[RawPublicKey, ...]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    @field_validator("revoked")
    @classmethod
    def _check_sorted_and_unique(cls, revoked: tuple[bytes, ...]) -> tuple[bytes, ...]:
        # One order only, so that one set of keys has one signed encoding and lookups can bisect.
        if any(later <= earlier for earlier, later in pairwise(revoked)):
            raise ValueError("revoked device keys must be sorted and without duplicates")
        return revoked

    def signed_payload(self) -> bytes:
        """Canonical CBOR of every field but the signature: the bytes the account key signs."""
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse a revocation list; checks the size cap before decoding. Does not verify the signature."""
        return cls.parse_canonical(
            data,
            what="revocation list",
            max_bytes=REVOCATION_LIST_MAX_BYTES,
            version=REVOCATION_LIST_VERSION,
            tuples=("revoked",),
        )

    def verify(self) -> None:
        """Check that the account key signed this list; raises IdentityError if not."""
        try:
            account_key = Ed25519PublicKey.from_public_bytes(self.account_public_key)
            account_key.verify(self.signature, self.signed_payload())
        except (InvalidSignature, ValueError) as error:
            raise IdentityError(
                f"revocation list signature does not verify against account {self.account_id}"
            ) from error

    def is_revoked(self, device_public_key: bytes) -> bool:
        """Whether this list revokes ``device_public_key`` (raw 32 bytes)."""
        index = bisect.bisect_left(self.revoked, device_public_key)
        return index < len(self.revoked) and self.revoked[index] == device_public_key

    @property
    def account_id(self) -> str:
        return hashlib.sha256(self.account_public_key).hexdigest()


def issue_revocation_list(
    account_key: Ed25519PrivateKey, revoked: Iterable[bytes], *, serial: int, now: float | None = None
) -> RevocationList:
    """Sign a list revoking the device keys ``revoked`` (any order, duplicates dropped) as ``serial``."""
    fields = {
        "version": REVOCATION_LIST_VERSION,
        "account_public_key": raw_public_key(account_key),
        "serial": serial,
        "issued_at": int(time.time() if now is None else now),
        "revoked": tuple(sorted(set(revoked))),
        "signature": bytes(64),
    }
    try:
        unsigned = RevocationList.model_validate(fields)
    except ValidationError as error:
        raise IdentityError(f"cannot issue a revocation list: {describe_validation_error(error)}") from error
    signed = unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})
    if (size := len(signed.to_bytes())) > REVOCATION_LIST_MAX_BYTES:
        raise IdentityError(f"revocation list is {size} bytes, over the {REVOCATION_LIST_MAX_BYTES}-byte cap")
    return signed


class RevocationBook:
    """Latest verified revocation list per account, as a node knows them (in memory, persisted by the caller with to_bytes/from_bytes)."""

    def __init__(self, lists: Iterable[RevocationList] = ()) -> None:
        self._lists: dict[bytes, RevocationList] = {}
        self._sizes: dict[bytes, int] = {}  # account public key -> its list's encoded bytes
        for revocations in lists:
            self.accept(revocations)

    @property
    def size_bytes(self) -> int:
        """The bytes the lists held take in the stored book (what counts against the cap)."""
        return sum(self._sizes.values())

    def accept(self, revocations: RevocationList, *, over_cap: bool = False) -> bool:
        """Store a verified list if it is newer than the one held for its account; True if stored.

        A list that would take the book over its cap raises IdentityError and changes nothing (the
        lists held, this account's older one included, stay enforced); ``over_cap`` keeps it anyway
        (the node's own account's list, and a book read back from disk).
        """
        revocations.verify()
        account = revocations.account_public_key
        held = self._lists.get(account)
        if held is not None and revocations.serial <= held.serial:
            return False
        size = len(revocations.to_bytes()) + _ITEM_HEADER_BYTES
        total = self.size_bytes - self._sizes.get(account, 0) + size
        if total > REVOCATION_BOOK_KEEP_BYTES and not over_cap:
            raise IdentityError(
                f"revocation book is full ({REVOCATION_BOOK_KEEP_BYTES} bytes): the list of account "
                f"{revocations.account_id} is refused; the lists held stay in force"
            )
        self._lists[account], self._sizes[account] = revocations, size
        return True

    def is_revoked(self, certificate: DeviceCertificate) -> bool:
        """Whether the certificate's own account has revoked the certificate's device key."""
        revocations = self._lists.get(certificate.account_public_key)
        return revocations is not None and revocations.is_revoked(certificate.device_public_key)

    def lists(self) -> list[RevocationList]:
        """The lists held, one per account, ordered by account public key."""
        return [self._lists[account] for account in sorted(self._lists)]

    def to_bytes(self) -> bytes:
        """A canonical CBOR array of each list's own encoding."""
        return cbor2.dumps([revocations.to_bytes() for revocations in self.lists()], canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationBook:
        """Parse and re-verify a book; checks the size cap before decoding; raises IdentityError."""
        decoded = decode_cbor("revocation book", data, REVOCATION_BOOK_MAX_BYTES, max_depth=2)
        if not isinstance(decoded, list) or not all(isinstance(item, bytes) for item in decoded):
            raise IdentityError("revocation book is not a CBOR array of encoded revocation lists")
        book = cls()
        for index, item in enumerate(decoded):
            try:
                revocations = RevocationList.from_bytes(item)
                if revocations.account_public_key in book._lists:
                    raise IdentityError(f"a second list for account {revocations.account_id}")
                book.accept(revocations, over_cap=True)  # bounded when it was kept
            except IdentityError as error:
                raise IdentityError(f"revocation book entry {index}: {error.message}") from error
        return book
