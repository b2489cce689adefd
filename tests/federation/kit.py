"""What the federation tests share: a clock, keys, refusal checks, re-signing and re-encoding."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.errors import FederationError
from mycellm.federation.descriptions import (
    DESCRIPTION_MAX_BYTES,
)
from mycellm.federation.signed import build_signed
from mycellm.identity.canonical import CanonicalModel

NOW = 1_700_000_000
DAY = 86400


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def refused(code: str | None = None) -> Any:
    """A context that expects a FederationError (with ``code`` when given)."""
    return pytest.raises(FederationError) if code is None else _Code(code)


class _Code:
    """pytest.raises(FederationError) that also checks the error's code."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.raises = pytest.raises(FederationError)

    def __enter__(self) -> Any:
        self.info = self.raises.__enter__()
        return self.info

    def __exit__(self, *exc: Any) -> bool:
        handled = self.raises.__exit__(*exc)
        assert self.info.value.code == self.code, self.info.value.message
        return bool(handled)


def resign(value: CanonicalModel, key: Ed25519PrivateKey, **update: Any) -> Any:
    """The same kind of value with some fields changed, properly signed by ``key``."""
    fields = {**value.model_dump(exclude={"signature"}), **update}
    return build_signed(type(value), key, fields, what="test value", max_bytes=DESCRIPTION_MAX_BYTES)


def noncanonical(data: bytes) -> bytes:
    """The same CBOR map with its keys in reverse canonical order (a second encoding of it)."""
    decoded = cbor2.loads(data)
    return cbor2.dumps(dict(reversed(list(decoded.items()))))
