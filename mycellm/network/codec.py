"""The frame codec: a 4-byte length, then CBOR {v, k, b}; the cap is checked before decoding."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import cbor2
from pydantic import ValidationError

from mycellm.errors import (
    ProtocolError,
)
from mycellm.network.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    WireMessage,
)

HEADER = struct.Struct("!I")


DEFAULT_MAX_FRAME_BYTES = 1 << 20


def encode_frame(message: WireMessage, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    body = cbor2.dumps({"v": PROTOCOL_VERSION, "k": message.kind, "b": message.model_dump()})
    if len(body) > max_bytes:
        raise ProtocolError(
            f"{message.kind} frame of {len(body)} bytes is over the {max_bytes}-byte cap", code="too_large"
        )
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> WireMessage:
    """One frame body (without its length prefix) into its message; ProtocolError if it is not one."""
    try:
        envelope = cbor2.loads(body, max_depth=32, allow_duplicate_keys=False)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as error:
        raise ProtocolError(
            f"frame is not valid CBOR: {error}", code="bad_frame", recoverable=True
        ) from error
    if not isinstance(envelope, dict) or set(envelope) != {"v", "k", "b"}:
        raise ProtocolError("frame is not a map of v, k and b", code="bad_frame", recoverable=True)
    if envelope["v"] != PROTOCOL_VERSION or type(envelope["v"]) is not int:
        raise ProtocolError(
            f"protocol version {envelope['v']!r} is not supported (this node speaks {PROTOCOL_VERSION})",
            code="unsupported_version",
            recoverable=True,
        )
    kind = envelope["k"]
    message_type = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if message_type is None:
        raise ProtocolError(f"unknown message kind {kind!r}", code="unknown_kind", recoverable=True)
    if not isinstance(envelope["b"], dict):
        raise ProtocolError(f"{kind} body is not a map", code="bad_frame", recoverable=True)
    try:
        return message_type.model_validate(envelope["b"])
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise ProtocolError(f"{kind}.{where}: {first['msg']}", code="bad_frame", recoverable=True) from error


class FrameReader:
    """Reassembles frames from stream bytes; the declared length is checked before buffering."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._broken = False
        self.frame_bytes = 0  # size of the frame last yielded, its length prefix included

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[WireMessage | ProtocolError]:
        """Messages completed by ``data``; a bad frame yields its ProtocolError in its place.

        After an unrecoverable error (oversized length) the reader drops everything that follows.
        """
        if self._broken:
            return
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max_bytes:
                self._broken = True
                self._buffer.clear()
                yield ProtocolError(
                    f"frame of {length} bytes is over the {self._max_bytes}-byte cap", code="too_large"
                )
                return
            if len(self._buffer) < HEADER.size + length:
                return
            body = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            self.frame_bytes = HEADER.size + length
            try:
                yield decode_body(body)
            except ProtocolError as error:
                yield error
