"""Network ids: derived from the authority account's public key and, for further networks, a name."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from pydantic import AfterValidator, Field

from mycellm.errors import FederationError
from mycellm.types import NetworkId

NETWORK_NAME_MAX_CHARS = 64

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

_NETWORK_ID = re.compile(r"[0-9a-f]{64}")


def check_network_name(name: str) -> str:
    """A network name is 1..64 characters of ``A-Z a-z 0-9 . _ -``; ValueError if not."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"network name {name[:80]!r} is not 1..64 characters of A-Za-z0-9._-")
    return name


def check_network_id(network_id: str) -> str:
    """A network id is 64 lowercase hex digits (a SHA-256); ValueError if not."""
    if not _NETWORK_ID.fullmatch(network_id):
        raise ValueError(f"network id {network_id[:80]!r} is not 64 lowercase hex digits")
    return network_id


NetworkName = Annotated[
    str, Field(min_length=1, max_length=NETWORK_NAME_MAX_CHARS), AfterValidator(check_network_name)
]

NetworkIdText = Annotated[str, Field(min_length=64, max_length=64), AfterValidator(check_network_id)]


def network_id_for(authority_public_key: bytes, name: str | None = None) -> NetworkId:
    """The id of a network hosted by the account whose raw 32-byte Ed25519 key is ``authority_public_key``.

    - The account's default (first) network, ``name`` None: ``sha256(key)`` as 64 lowercase hex
      digits. This is the SHA-256 of the authority key the architecture names, and equals the
      account's own id (``AccountId``).
    - Any further network of the same account, ``name`` given: ``sha256(key || 0x00 || name)``
      hex, where ``name`` is UTF-8 (it is ASCII: 1..64 characters of ``A-Z a-z 0-9 . _ -``).

    The key is always 32 bytes, so a named input (at least 34 bytes) never equals a default one
    (32 bytes): one account can host its default network and any number of named ones, each with
    its own id, and two accounts never share an id (short of a SHA-256 collision). The name is
    case-sensitive and is not normalised. Raises FederationError for a bad key length or name.
    """
    if not isinstance(authority_public_key, bytes) or len(authority_public_key) != 32:
        raise FederationError("an authority public key is 32 raw bytes", code="malformed")
    if name is None:
        return NetworkId(hashlib.sha256(authority_public_key).hexdigest())
    try:
        check_network_name(name)
    except ValueError as error:
        raise FederationError(str(error), code="malformed") from error
    digest = hashlib.sha256(authority_public_key + b"\x00" + name.encode("utf-8"))
    return NetworkId(digest.hexdigest())
