"""Device certificates: an account key vouches for a device key (CBOR, signed, with expiry)."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Annotated, Literal

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ConfigDict, Field, ValidationError

from mycellm.errors import IdentityError
from mycellm.identity.canonical import CanonicalModel, describe_validation_error

logger = logging.getLogger(__name__)


CERTIFICATE_VERSION = 1


CERTIFICATE_MAX_BYTES = 4096


DEFAULT_VALIDITY_S = 365 * 86400


Role = Literal["node", "bootstrap", "client"]


RawPublicKey = Annotated[bytes, Field(min_length=32, max_length=32)]


def peer_id_for(device_public_key: bytes) -> str:
    """The peer id of a device: SHA-256 (hex) of its raw 32-byte Ed25519 public key."""
    if len(device_public_key) != 32:
        raise IdentityError(f"a device public key is 32 raw bytes, not {len(device_public_key)}")
    return hashlib.sha256(device_public_key).hexdigest()


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class DeviceCertificate(CanonicalModel):
    """An account key's statement that a device key belongs to it, for a role, name and time span."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = CERTIFICATE_VERSION
    account_public_key: RawPublicKey
    device_public_key: RawPublicKey
    role: Role
    name: Annotated[str, Field(min_length=1, max_length=64)]
    issued_at: Annotated[int, Field(ge=0)]
    expires_at: Annotated[int, Field(ge=0)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    def signed_payload(self) -> bytes:
        """Canonical CBOR of every field but the signature: the bytes the account key signs."""
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceCertificate:
        """Parse a certificate; checks the size cap before decoding. Does not verify the signature."""
        return cls.parse_canonical(
            data, what="device certificate", max_bytes=CERTIFICATE_MAX_BYTES, version=CERTIFICATE_VERSION
        )

    def verify_signature(self) -> None:
        """Check that the account key signed this certificate; raises IdentityError if not."""
        try:
            account_key = Ed25519PublicKey.from_public_bytes(self.account_public_key)
            account_key.verify(self.signature, self.signed_payload())
        except (InvalidSignature, ValueError) as error:
            raise IdentityError(
                f"device certificate signature does not verify against account {self.account_id}"
            ) from error

    def verify(
        self, now: float | None = None, clock_skew_s: float = 300, *, signature_checked: bool = False
    ) -> None:
        """Check the signature and the validity period at ``now``; raises IdentityError if either fails.

        ``signature_checked``: the caller already verified this very certificate's signature.
        """
        if not signature_checked:
            self.verify_signature()
        now = time.time() if now is None else now
        if self.expires_at <= self.issued_at:
            raise IdentityError(
                f"device certificate expires ({self.expires_at}) before it is issued ({self.issued_at})"
            )
        if self.issued_at > now + clock_skew_s:
            raise IdentityError(
                f"device certificate is issued in the future ({self.issued_at}, now {int(now)})"
            )
        if now >= self.expires_at:
            raise IdentityError(f"device certificate expired at {self.expires_at} (now {int(now)})")

    @property
    def peer_id(self) -> str:
        return peer_id_for(self.device_public_key)

    @property
    def account_id(self) -> str:
        return hashlib.sha256(self.account_public_key).hexdigest()


def issue_device_certificate(
    account_key: Ed25519PrivateKey,
    device_public_key: bytes,
    *,
    name: str,
    role: Role = "node",
    validity_s: int = DEFAULT_VALIDITY_S,
    now: float | None = None,
) -> DeviceCertificate:
    """Sign a certificate with ``account_key`` binding ``device_public_key`` from now for validity_s."""
    if validity_s <= 0:
        raise IdentityError(f"certificate validity must be positive, not {validity_s} s")
    issued_at = int(time.time() if now is None else now)
    fields = {
        "version": CERTIFICATE_VERSION,
        "account_public_key": raw_public_key(account_key),
        "device_public_key": device_public_key,
        "role": role,
        "name": name,
        "issued_at": issued_at,
        "expires_at": issued_at + validity_s,
    }
    try:
        unsigned = DeviceCertificate.model_validate({**fields, "signature": bytes(64)})
    except ValidationError as error:
        raise IdentityError(
            f"cannot issue a device certificate: {describe_validation_error(error)}"
        ) from error
    return unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})
