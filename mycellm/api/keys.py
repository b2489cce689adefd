"""API keys, Ray-free: their text, digest and check, the scope each route needs, and their JSON views.

A key reads ``mck_<key id>_<secret>``: 16 hex characters of public id (how the node finds the key
without a scan) and 32 random bytes from ``secrets`` as URL-safe base64 (43 characters), so the
whole key is URL-safe and can sit in a header, an environment variable or a URL.

The node keeps only the SHA-256 digest of the whole key text, never the secret, and compares
digests with ``hmac.compare_digest``. A fast digest is the right hash here: a slow password hash
(argon2, bcrypt, scrypt) exists to make guessing a *low-entropy* password from its hash expensive,
and costs milliseconds of CPU per check, on every request. A key holds 256 random bits, so no
amount of guessing finds it from its digest, and a SHA-256 costs about a microsecond. A stolen
database gives an attacker digests only, from which no key can be rebuilt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mycellm.api.openai import JsonInt, JsonNumber
from mycellm.errors import AuthenticationError
from mycellm.ledger.api_keys import ApiKeyRecord, utc_day
from mycellm.ledger.pricing import MICRO, credits

Scope = Literal["inference", "read", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)

KEY_PREFIX = "mck_"
KEY_ID_BYTES = 8
SECRET_BYTES = 32
KEY_PATTERN = re.compile(r"mck_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
MAX_RPM = 10_000  # the rate window keeps one timestamp per request of the last minute
MAX_VALIDITY_S = 365 * 86400  # a year, as `--expires` (parse_duration) allows
MAX_BUDGET_CREDITS = 1e9

# The digest a missing key id is compared with: every failed check costs the same.
_NO_DIGEST = hashlib.sha256(b"no such key").digest()

# The scope each route of the HTTP API needs (None: open to anyone, like a liveness probe).
ROUTE_SCOPES: dict[str, Scope | None] = {
    "chat_completions": "inference",
    "completions": "inference",
    "embeddings": "inference",
    "list_models": "inference",
    "get_model": "inference",
    "health": None,
    "node_status": "read",
    "node_requests": "read",
    "node_credits": "read",
    "node_receipts": "read",
    "node_peers": "read",
    "metrics": "read",
    "list_keys": "admin",
    "create_key": "admin",
    "revoke_key": "admin",
}


def key_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def mint_key(
    *,
    scopes: tuple[Scope, ...],
    now: float,
    name: str = "",
    network: str | None = None,
    budget_micro: int | None = None,
    rpm: int | None = None,
    expires_at: float | None = None,
) -> tuple[str, ApiKeyRecord]:
    """A new key: its text (shown once, never stored) and the record the node keeps."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    text = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    record = ApiKeyRecord(
        key_id=key_id,
        name=name,
        digest=key_digest(text),
        scopes=tuple(sorted(set(scopes))),
        network=network,
        budget_micro=budget_micro,
        rpm=rpm,
        created_at=now,
        expires_at=expires_at,
        day=utc_day(now),
    )
    return text, record


def looks_like_key(text: str) -> bool:
    """Whether a credential is meant as a mycellm key (other clients send ``Bearer unused`` and the like)."""
    return text.startswith(KEY_PREFIX)


def check_key(text: str, keys: Mapping[str, ApiKeyRecord], now: float) -> ApiKeyRecord:
    """The record of a key that is well formed, known, matches its digest, unrevoked and unexpired.

    AuthenticationError otherwise: ``invalid_api_key`` (malformed, unknown or wrong secret; the
    three look alike), ``api_key_revoked``, ``api_key_expired``.
    """
    match = KEY_PATTERN.fullmatch(text)
    record = keys.get(match.group(1)) if match else None
    expected = record.digest if record is not None else _NO_DIGEST
    if not hmac.compare_digest(expected, key_digest(text)) or record is None:
        raise AuthenticationError("Incorrect API key provided")
    if record.revoked_at is not None:
        raise AuthenticationError(f"API key {record.key_id} was revoked", code="api_key_revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise AuthenticationError(f"API key {record.key_id} has expired", code="api_key_expired")
    return record


def key_id_of(text: str) -> str | None:
    """The public id in a key's text, if it is well formed."""
    match = KEY_PATTERN.fullmatch(text)
    return match.group(1) if match else None


def key_view(record: ApiKeyRecord, now: float) -> dict[str, Any]:
    """A key as plain JSON values, without digest or secret (``keys list`` and GET /v1/node/keys)."""
    day = utc_day(now)
    return {
        "object": "api_key",
        "id": record.key_id,
        "name": record.name,
        "scopes": list(record.scopes),
        "network": record.network,
        "budget": None if record.budget_micro is None else credits(record.budget_micro),
        "spent_today": credits(record.spent_on(day)),
        "reserved": credits(record.reserved_micro),
        "rpm": record.rpm,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "last_used_at": record.last_used_at,
        "active": record.active(now),
    }


def budget_micro(budget_credits: float | None) -> int | None:
    return None if budget_credits is None else round(budget_credits * MICRO)


class KeyCreateBody(BaseModel):
    """POST /v1/node/keys: a new key's scopes and limits (the key's text comes back once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scopes: list[Scope] = Field(
        min_length=1,
        max_length=len(SCOPES),
        json_schema_extra={"uniqueItems": True},
        description="What the key may call",
    )
    name: str = Field(default="", max_length=128, description="A label for people")
    network: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Network id or name the key's requests belong to; absent: the node's default",
    )
    budget: JsonNumber | None = Field(
        default=None,
        json_schema_extra={"minimum": 0, "maximum": MAX_BUDGET_CREDITS},
        description="Credits per UTC day; absent: no budget",
    )
    rpm: JsonInt | None = Field(
        default=None, json_schema_extra={"minimum": 1, "maximum": MAX_RPM}, description="Requests per minute"
    )
    expires_in_s: JsonInt | None = Field(
        default=None,
        json_schema_extra={"minimum": 1, "maximum": MAX_VALIDITY_S},
        description="Seconds until the key expires; absent: never",
    )

    @field_validator("scopes")
    @classmethod
    def _unique(cls, value: list[Scope]) -> list[Scope]:
        if len(set(value)) != len(value):
            raise ValueError("scopes must not repeat")
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= MAX_BUDGET_CREDITS:
            raise ValueError(f"budget must be between 0 and {MAX_BUDGET_CREDITS:.0f} credits")
        return value

    @field_validator("rpm")
    @classmethod
    def _rpm(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_RPM:
            raise ValueError(f"rpm must be between 1 and {MAX_RPM}")
        return value

    @field_validator("expires_in_s")
    @classmethod
    def _expiry(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_VALIDITY_S:
            raise ValueError(f"expires_in_s must be between 1 and {MAX_VALIDITY_S}")
        return value

    def mint(self, now: float) -> tuple[str, ApiKeyRecord]:
        return mint_key(
            scopes=tuple(self.scopes),
            now=now,
            name=self.name,
            network=self.network,
            budget_micro=budget_micro(self.budget),
            rpm=self.rpm,
            expires_at=None if self.expires_in_s is None else now + self.expires_in_s,
        )
