"""Strict canonical CBOR for signed values: size cap before decoding, exact fields, one encoding."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import cbor2
from pydantic import BaseModel, ValidationError

from mycellm.errors import IdentityError

logger = logging.getLogger(__name__)


def describe_validation_error(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())


def decode_cbor(what: str, data: bytes, max_bytes: int, max_depth: int) -> Any:
    """CBOR ``data`` after checking the size cap; IdentityError naming ``what`` if it is not CBOR."""
    if len(data) > max_bytes:
        raise IdentityError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte cap")
    try:
        return cbor2.loads(data, max_depth=max_depth, allow_duplicate_keys=False)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as error:
        raise IdentityError(f"{what} is not valid CBOR: {error}") from error


SignedModel = TypeVar("SignedModel", bound="CanonicalModel")


class CanonicalModel(BaseModel):
    """A signed value stored as a canonical CBOR map of exactly its fields."""

    def to_bytes(self) -> bytes:
        """Canonical CBOR map of every field, signature included."""
        return cbor2.dumps(self.model_dump(), canonical=True)

    @classmethod
    def parse_canonical(
        cls: type[SignedModel],
        data: bytes,
        *,
        what: str,
        max_bytes: int,
        version: int,
        tuples: tuple[str, ...] = (),
    ) -> SignedModel:
        """Strict parse: size cap before decoding, exact fields, version, one encoding only."""
        decoded = decode_cbor(what, data, max_bytes, max_depth=4)
        if not isinstance(decoded, dict):
            raise IdentityError(f"{what} is not a CBOR map but {type(decoded).__name__}")
        expected = set(cls.model_fields)
        missing = sorted(expected - decoded.keys())
        extra = sorted(repr(key) for key in decoded.keys() - expected)
        if missing:
            raise IdentityError(f"{what} lacks field(s): {', '.join(missing)}")
        if extra:
            raise IdentityError(f"{what} has unexpected field(s): {', '.join(extra)}")
        if decoded["version"] != version or type(decoded["version"]) is not int:
            raise IdentityError(f"{what} version {decoded['version']!r} is not supported")
        for name in tuples:
            if isinstance(decoded[name], list):
                decoded[name] = tuple(decoded[name])  # CBOR arrays decode as lists
        try:
            parsed = cls.model_validate(decoded)
        except ValidationError as error:
            raise IdentityError(f"{what} is malformed: {describe_validation_error(error)}") from error
        # Signed bytes must have one encoding only; this also rejects trailing bytes.
        if parsed.to_bytes() != data:
            raise IdentityError(f"{what} is not in canonical CBOR encoding")
        return parsed
