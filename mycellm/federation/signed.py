"""What the signed values of networks share: strict parsing into typed errors, signing, signatures, time windows."""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Annotated, Any, Literal, TypeVar

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AfterValidator, Field, ValidationError

from mycellm.errors import FederationError, IdentityError
from mycellm.identity.canonical import CanonicalModel, decode_cbor, describe_validation_error

Signature = Annotated[bytes, Field(min_length=64, max_length=64)]

Timestamp = Annotated[int, Field(ge=0, le=2**40)]  # whole seconds since the epoch

MemberRole = Literal["seeder", "consumer", "relay", "admin"]

MAX_BOOTSTRAP_ADDRESSES = 16

DEFAULT_CLOCK_SKEW_S = 300

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_host(host: str) -> bool:
    """A DNS name or IPv4 address (dot-separated labels), or an IPv6 address in brackets."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return "%" not in host
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.split("."))


def check_address(address: str) -> str:
    """A bootstrap address is ``host:port`` (an IPv6 host in brackets), port 1..65535."""
    host, separator, port = address.rpartition(":")
    if not separator or not _is_host(host):
        raise ValueError(f"bootstrap address {address[:80]!r} is not host:port")
    if not port.isascii() or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise ValueError(f"bootstrap address {address[:80]!r} has no port in 1..65535")
    return address


def _check_unique(addresses: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(addresses)) != len(addresses):
        raise ValueError("bootstrap addresses must not repeat")
    return addresses


BootstrapAddress = Annotated[str, Field(min_length=3, max_length=261), AfterValidator(check_address)]

# Order is the authority's order of preference, so it is kept; repeats are refused.
BootstrapAddresses = Annotated[
    tuple[BootstrapAddress, ...],
    Field(max_length=MAX_BOOTSTRAP_ADDRESSES),
    AfterValidator(_check_unique),
]

SignedValue = TypeVar("SignedValue", bound=CanonicalModel)


def signed_payload(value: CanonicalModel) -> bytes:
    """Canonical CBOR of every field but the signature: the bytes the authority signs."""
    return cbor2.dumps(value.model_dump(exclude={"signature"}), canonical=True)


def parse_signed(
    cls: type[SignedValue],
    data: bytes,
    *,
    what: str,
    max_bytes: int,
    version: int,
    tuples: tuple[str, ...] = (),
) -> SignedValue:
    """Strict parse (size cap first, exact fields, version, one encoding); FederationError if refused."""
    if not isinstance(data, bytes):
        raise FederationError(f"{what} is not bytes but {type(data).__name__}", code="malformed")
    try:
        return cls.parse_canonical(data, what=what, max_bytes=max_bytes, version=version, tuples=tuples)
    except IdentityError as error:
        raise FederationError(error.message, code="malformed") from error


def build_signed(
    cls: type[SignedValue], key: Ed25519PrivateKey, fields: dict[str, Any], *, what: str, max_bytes: int
) -> SignedValue:
    """Validate ``fields``, sign them with ``key`` and check the encoded size; FederationError if not."""
    try:
        unsigned = cls.model_validate({**fields, "signature": bytes(64)})
    except ValidationError as error:
        raise FederationError(
            f"cannot issue a {what}: {describe_validation_error(error)}", code="malformed"
        ) from error
    signed = unsigned.model_copy(update={"signature": key.sign(signed_payload(unsigned))})
    if (size := len(signed.to_bytes())) > max_bytes:
        raise FederationError(f"{what} is {size} bytes, over the {max_bytes}-byte cap", code="malformed")
    return signed


def check_signature(value: CanonicalModel, public_key: bytes, *, what: str) -> None:
    """Check that ``public_key`` signed ``value``; FederationError (bad_signature) if not."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            value.signature,  # type: ignore[attr-defined]
            signed_payload(value),
        )
    except (InvalidSignature, ValueError) as error:
        raise FederationError(
            f"{what} signature does not verify against its authority key", code="bad_signature"
        ) from error


def check_window(
    what: str, issued_at: int, expires_at: int, now: float | None, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
) -> None:
    """Check issued_at <= now (give or take the skew) < expires_at; FederationError if not."""
    now = time.time() if now is None else now
    if expires_at <= issued_at:
        raise FederationError(
            f"{what} expires ({expires_at}) before it is issued ({issued_at})", code="malformed"
        )
    if issued_at > now + clock_skew_s:
        raise FederationError(
            f"{what} is issued in the future ({issued_at}, now {int(now)})", code="not_yet_valid"
        )
    if now >= expires_at:
        raise FederationError(f"{what} expired at {expires_at} (now {int(now)})", code="expired")


def whole_seconds(now: float | None) -> int:
    return int(time.time() if now is None else now)


def decode_book(what: str, data: bytes, max_bytes: int) -> list[bytes]:
    """A CBOR array of byte strings (a book of encoded values), size cap first; FederationError if not."""
    if not isinstance(data, bytes):
        raise FederationError(f"{what} is not bytes", code="malformed")
    try:
        decoded = decode_cbor(what, data, max_bytes, max_depth=2)
    except IdentityError as error:
        raise FederationError(error.message, code="malformed") from error
    if not isinstance(decoded, list) or not all(isinstance(item, bytes) for item in decoded):
        raise FederationError(f"{what} is not a CBOR array of encoded values", code="malformed")
    if cbor2.dumps(decoded, canonical=True) != data:
        raise FederationError(f"{what} is not in canonical CBOR encoding", code="malformed")
    return decoded
