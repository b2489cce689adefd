"""Invite tokens: an authority's signed, portable offer to join its network, and counting their uses."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ConfigDict, Field

from mycellm.errors import FederationError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.network_ids import NetworkIdText, NetworkName, network_id_for
from mycellm.federation.signed import (
    DEFAULT_CLOCK_SKEW_S,
    BootstrapAddresses,
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
from mycellm.identity.certificates import RawPublicKey, raw_public_key

INVITE_VERSION = 1

INVITE_MAX_BYTES = 8192

# Unpadded base64 of INVITE_MAX_BYTES bytes; longer text is refused before it is decoded.
INVITE_TEXT_MAX_CHARS = (INVITE_MAX_BYTES * 4 + 2) // 3

INVITE_URL_PREFIX = "mycellm://join?token="

MAX_INVITE_USES = 1000

DEFAULT_INVITE_VALIDITY_S = 7 * 86400

_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]+")


class InviteToken(CanonicalModel):
    """An authority's signed offer: join this network, in this role, up to max_uses times, until expires_at.

    The token carries the network's name and default flag so that a redeemer can check the network
    id against the authority key without having the description yet; ``bind_key``, when set, is the
    one member account the invite is for.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = INVITE_VERSION
    network_id: NetworkIdText
    network_name: NetworkName
    default: bool
    authority_public_key: RawPublicKey
    bootstrap: BootstrapAddresses
    role: MemberRole
    max_uses: Annotated[int, Field(ge=1, le=MAX_INVITE_USES)]
    issued_at: Timestamp
    expires_at: Timestamp
    nonce: Annotated[bytes, Field(min_length=16, max_length=16)]
    bind_key: RawPublicKey | None
    signature: Signature

    @classmethod
    def from_bytes(cls, data: bytes) -> InviteToken:
        """Parse a token; checks the size cap before decoding. Does not verify the signature."""
        return parse_signed(
            cls,
            data,
            what="invite token",
            max_bytes=INVITE_MAX_BYTES,
            version=INVITE_VERSION,
            tuples=("bootstrap",),
        )

    def to_text(self) -> str:
        """The token as URL-safe base64 without padding."""
        return base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")

    def to_url(self) -> str:
        """The token as a ``mycellm://join?token=...`` link."""
        return INVITE_URL_PREFIX + self.to_text()

    @classmethod
    def from_text(cls, text: str) -> InviteToken:
        """Parse either text form, strictly: length cap first, one alphabet, one encoding, no padding.

        Does not verify the signature. Raises FederationError (``malformed``).
        """
        if not isinstance(text, str):
            raise FederationError(f"invite text is not a string but {type(text).__name__}", code="malformed")
        if len(text) > len(INVITE_URL_PREFIX) + INVITE_TEXT_MAX_CHARS:
            raise FederationError(f"invite text is {len(text)} characters, over the cap", code="malformed")
        token = text.removeprefix(INVITE_URL_PREFIX)
        if len(token) > INVITE_TEXT_MAX_CHARS or not _TOKEN_TEXT.fullmatch(token) or len(token) % 4 == 1:
            raise FederationError(
                "invite text is neither an unpadded URL-safe base64 token nor a mycellm://join link",
                code="malformed",
            )
        try:
            data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as error:
            raise FederationError(f"invite text is not base64: {error}", code="malformed") from error
        # Unused low bits of the last character give other spellings of the same bytes: refuse them.
        if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != token:
            raise FederationError("invite text is not in canonical base64", code="malformed")
        return cls.from_bytes(data)

    def verify(self, now: float | None = None, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S) -> None:
        """Check the authority's signature, the network id against its key and name, and the validity."""
        check_signature(self, self.authority_public_key, what="invite token")
        expected = network_id_for(self.authority_public_key, None if self.default else self.network_name)
        if self.network_id != expected:
            raise FederationError(
                f"invite names network {self.network_id}, but its authority key and name give {expected}",
                code="wrong_network",
            )
        check_window("invite token", self.issued_at, self.expires_at, now, clock_skew_s)

    def check_redeemer(self, account_public_key: bytes) -> None:
        """Check that the account may redeem this invite (any account, or the one it is bound to)."""
        if self.bind_key is not None and self.bind_key != account_public_key:
            raise FederationError("invite is bound to another member account", code="wrong_member")

    def check_for(self, description: NetworkDescription) -> None:
        """Check the invite is for ``description``'s network, from the same authority."""
        if (self.network_id, self.authority_public_key) != (
            description.network_id,
            description.authority_public_key,
        ):
            raise FederationError(
                f"invite is for network {self.network_id}, not {description.network_id}",
                code="wrong_network",
            )


def issue_invite(
    authority_key: Ed25519PrivateKey,
    description: NetworkDescription,
    *,
    role: MemberRole = "consumer",
    max_uses: int = 1,
    validity_s: int = DEFAULT_INVITE_VALIDITY_S,
    bind_key: bytes | None = None,
    bootstrap: Iterable[str] | None = None,
    now: float | None = None,
) -> InviteToken:
    """Sign an invite to ``description``'s network (its bootstrap addresses unless others are given)."""
    public_key = raw_public_key(authority_key)
    if public_key != description.authority_public_key:
        raise FederationError("only the network's authority key issues its invites", code="bad_signature")
    if validity_s <= 0:
        raise FederationError(f"invite validity must be positive, not {validity_s} s", code="malformed")
    issued_at = whole_seconds(now)
    fields = {
        "version": INVITE_VERSION,
        "network_id": description.network_id,
        "network_name": description.name,
        "default": description.default,
        "authority_public_key": public_key,
        "bootstrap": description.bootstrap if bootstrap is None else tuple(bootstrap),
        "role": role,
        "max_uses": max_uses,
        "issued_at": issued_at,
        "expires_at": issued_at + validity_s,
        "nonce": os.urandom(16),
        "bind_key": bind_key,
    }
    return build_signed(InviteToken, authority_key, fields, what="invite token", max_bytes=INVITE_MAX_BYTES)


class InviteRedemptions:
    """The accounts that redeemed each invite, as its authority counts them (in memory, bounded).

    One account redeeming the same invite again is not a new use (a retried join), so an invite
    with ``max_uses`` admits that many distinct accounts. Tokens are told apart by their nonce.
    """

    def __init__(self, *, max_invites: int = 4096) -> None:
        self.max_invites = max_invites
        self._redeemers: dict[tuple[str, bytes], tuple[int, set[bytes]]] = {}

    def redeem(
        self,
        token: InviteToken,
        account_public_key: bytes,
        description: NetworkDescription,
        now: float | None = None,
    ) -> int:
        """Check and count one redemption; the uses left. FederationError if refused (no use counted)."""
        description.verify()
        token.verify(now)
        token.check_for(description)
        token.check_redeemer(account_public_key)
        key = (token.network_id, token.nonce)
        expires_at, redeemers = self._redeemers.get(key, (token.expires_at, set()))
        if account_public_key not in redeemers:
            if len(redeemers) >= token.max_uses:
                raise FederationError(f"invite was used {token.max_uses} time(s) already", code="used_up")
            if key not in self._redeemers:
                self.forget_expired(now)
                if len(self._redeemers) >= self.max_invites:
                    raise FederationError(f"{self.max_invites} invites are being counted", code="full")
            redeemers.add(account_public_key)
            self._redeemers[key] = (expires_at, redeemers)
        return token.max_uses - len(redeemers)

    def forget_expired(self, now: float | None = None) -> None:
        """Drop the counts of invites that expired (they can no longer be redeemed)."""
        moment = whole_seconds(now)
        for key in [key for key, (expires_at, _) in self._redeemers.items() if expires_at <= moment]:
            del self._redeemers[key]

    def uses(self, token: InviteToken) -> int:
        """How many distinct accounts redeemed ``token``."""
        return len(self._redeemers.get((token.network_id, token.nonce), (0, set()))[1])
