"""Wire messages between nodes: frozen models, the CBOR frame codec, its limits and signed hellos.

A frame is a 4-byte big-endian length followed by a CBOR map ``{"v": version, "k": kind, "b": body}``.
The length is checked against the cap before a byte of the body is kept or decoded. Every frame
carries the protocol version; a kind this build does not know is answered with an ``error``
frame whose code is ``unknown_kind`` (the stream stays usable, since framing is intact).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from typing import Annotated, ClassVar, Literal, cast, get_args

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mycellm import __version__
from mycellm.engines.base import (
    EmbeddingRequest,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    ToolCall,
    Usage,
)
from mycellm.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    MycellmError,
    PaymentRequiredError,
    PeerError,
    ProtocolError,
    ReceiptError,
    RequestCancelledError,
    UnsupportedParameterError,
)
from mycellm.identity import NodeIdentity

PROTOCOL_VERSION = 1
ALPN = "mycellm/1"
HEADER = struct.Struct("!I")
DEFAULT_MAX_FRAME_BYTES = 1 << 20
MAX_PEERS_PER_MESSAGE = 256
HELLO_MAX_AGE_S = 120.0

PeerId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ErrorCode = Literal[
    "bad_frame",
    "too_large",
    "unsupported_version",
    "unknown_kind",
    "unexpected",
    "bad_hello",
    "replayed",
    "invalid_request",
    "context_length",
    "unsupported_parameter",
    "model_not_found",
    "engine_error",
    "cancelled",
    "insufficient_credits",
    "receipt_refused",
    "internal",
]


class WireMessage(BaseModel):
    """Base of every frame body; ``kind`` names it on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str]


class HelloMessage(WireMessage):
    """First message of each side of a link: who I am, what I serve, signed for this link only."""

    kind: ClassVar[str] = "hello"
    peer_id: PeerId
    to_peer_id: PeerId
    node_name: str = Field(max_length=64)
    software_version: str = Field(max_length=32)
    protocol_version: int
    sent_at: float
    nonce: bytes = Field(min_length=16, max_length=16)
    binding: bytes = Field(max_length=64)  # the link's original connection id: pins the hello to it
    address: str | None = Field(default=None, max_length=300)  # host:port where this node listens
    models: tuple[ModelInfo, ...] = Field(default=(), max_length=256)
    load: int = Field(default=0, ge=0)
    signature: bytes = Field(default=b"", max_length=64)

    def signed_payload(self) -> bytes:
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)


class PingMessage(WireMessage):
    kind: ClassVar[str] = "ping"
    seq: int = Field(ge=0)
    sent_at: float


class PongMessage(WireMessage):
    kind: ClassVar[str] = "pong"
    seq: int = Field(ge=0)
    sent_at: float
    load: int = Field(default=0, ge=0)


class InferenceMessage(WireMessage):
    kind: ClassVar[str] = "infer"
    request: GenerationRequest


class EmbedMessage(WireMessage):
    kind: ClassVar[str] = "embed"
    request: EmbeddingRequest


class EmbeddingMessage(WireMessage):
    kind: ClassVar[str] = "embedding"
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int = Field(ge=0)


class ChunkMessage(WireMessage):
    kind: ClassVar[str] = "chunk"
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class DoneMessage(WireMessage):
    kind: ClassVar[str] = "done"
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason
    usage: Usage


class ErrorMessage(WireMessage):
    kind: ClassVar[str] = "error"
    code: ErrorCode
    message: str = Field(max_length=2000)


class CancelMessage(WireMessage):
    kind: ClassVar[str] = "cancel"
    reason: str = Field(default="", max_length=200)


class ReceiptOfferMessage(WireMessage):
    """The consumer's signed terms for a request the other side served; answered with a receipt."""

    kind: ClassVar[str] = "receipt?"
    terms: bytes = Field(max_length=32768)
    consumer_signature: bytes = Field(min_length=64, max_length=64)


class ReceiptMessage(WireMessage):
    """The receipt countersigned by the seeder (canonical CBOR)."""

    kind: ClassVar[str] = "receipt"
    receipt: bytes = Field(max_length=65536)


class ReceiptsMessage(WireMessage):
    """Settled receipts passed around the network, so every node can recompute every balance."""

    kind: ClassVar[str] = "receipts"
    receipts: tuple[bytes, ...] = Field(default=(), max_length=64)


class PeerAddress(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    peer_id: PeerId
    address: str = Field(max_length=300)


class PeersRequestMessage(WireMessage):
    kind: ClassVar[str] = "peers?"


class PeersMessage(WireMessage):
    kind: ClassVar[str] = "peers"
    peers: tuple[PeerAddress, ...] = Field(default=(), max_length=MAX_PEERS_PER_MESSAGE)


class RevocationsMessage(WireMessage):
    """Signed revocation lists (each in its own canonical CBOR encoding)."""

    kind: ClassVar[str] = "revocations"
    lists: tuple[bytes, ...] = Field(default=(), max_length=64)


MESSAGE_TYPES: dict[str, type[WireMessage]] = {
    message.kind: message
    for message in (
        HelloMessage,
        PingMessage,
        PongMessage,
        InferenceMessage,
        EmbedMessage,
        EmbeddingMessage,
        ChunkMessage,
        DoneMessage,
        ErrorMessage,
        CancelMessage,
        PeersRequestMessage,
        PeersMessage,
        RevocationsMessage,
        ReceiptOfferMessage,
        ReceiptMessage,
        ReceiptsMessage,
    )
}


# -- codec ------------------------------------------------------------------------------------


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
            try:
                yield decode_body(body)
            except ProtocolError as error:
                yield error


# -- errors across the wire ---------------------------------------------------------------------

_ERROR_CODES: tuple[tuple[type[MycellmError], ErrorCode], ...] = (
    (ContextLengthError, "context_length"),
    (UnsupportedParameterError, "unsupported_parameter"),
    (InvalidRequestError, "invalid_request"),
    (ModelNotFoundError, "model_not_found"),
    (RequestCancelledError, "cancelled"),
    (PaymentRequiredError, "insufficient_credits"),
    (ReceiptError, "receipt_refused"),
    (EngineError, "engine_error"),
)


def error_message(error: BaseException) -> ErrorMessage:
    """The error frame that tells a peer why its request failed."""
    if isinstance(error, ProtocolError):
        code = error.code if error.code in get_args(ErrorCode) else "bad_frame"
        return ErrorMessage(code=cast(ErrorCode, code), message=error.message[:2000])
    for error_type, wire_code in _ERROR_CODES:
        if isinstance(error, error_type):
            return ErrorMessage(code=wire_code, message=error.message[:2000])
    return ErrorMessage(code="internal", message=f"internal error: {type(error).__name__}")


def error_from_message(message: ErrorMessage, peer_id: str) -> MycellmError:
    """A peer's error frame as the local error it stands for; route failures become PeerError."""
    text = f"peer {peer_id[:12]}: {message.message}"
    if message.code == "context_length":
        return ContextLengthError(text)
    if message.code == "unsupported_parameter":
        return UnsupportedParameterError(text)
    if message.code == "invalid_request":
        return InvalidRequestError(text)
    if message.code == "cancelled":
        return RequestCancelledError(text)
    if message.code == "insufficient_credits":
        return PaymentRequiredError(text, param="balance")
    if message.code == "receipt_refused":
        return ReceiptError(text)
    # model_not_found on a peer means our view of it is stale: another route may serve it.
    return PeerError(text, code=None if message.code == "engine_error" else f"peer_{message.code}")


# -- hello ------------------------------------------------------------------------------------------


def make_hello(
    identity: NodeIdentity,
    to_peer_id: str,
    binding: bytes,
    *,
    node_name: str,
    address: str | None,
    models: tuple[ModelInfo, ...],
    load: int,
    now: float | None = None,
) -> HelloMessage:
    unsigned = HelloMessage(
        peer_id=identity.peer_id,
        to_peer_id=to_peer_id,
        node_name=node_name[:64],
        software_version=__version__,
        protocol_version=PROTOCOL_VERSION,
        sent_at=time.time() if now is None else now,
        nonce=os.urandom(16),
        binding=binding,
        address=address,
        models=models,
        load=load,
    )
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.signed_payload())})


class HelloChecker:
    """Accepts a hello only from the authenticated device, for this node and link, fresh and once."""

    def __init__(self, own_peer_id: str, max_age_s: float = HELLO_MAX_AGE_S) -> None:
        self._own_peer_id = own_peer_id
        self._max_age_s = max_age_s
        self._seen: dict[bytes, float] = {}

    def check(
        self, hello: HelloMessage, device_public_key: bytes, binding: bytes, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"hello speaks protocol {hello.protocol_version}", code="unsupported_version")
        if hello.peer_id != hashlib.sha256(device_public_key).hexdigest():
            raise ProtocolError("hello names another peer than the link's certificate", code="bad_hello")
        if hello.to_peer_id != self._own_peer_id:
            raise ProtocolError("hello is addressed to another node", code="bad_hello")
        try:
            Ed25519PublicKey.from_public_bytes(device_public_key).verify(
                hello.signature, hello.signed_payload()
            )
        except (InvalidSignature, ValueError) as error:
            raise ProtocolError(
                "hello signature does not verify with the device key", code="bad_hello"
            ) from error
        if abs(now - hello.sent_at) > self._max_age_s:
            raise ProtocolError(f"hello is {now - hello.sent_at:.0f} s old", code="replayed")
        if hello.binding != binding:
            raise ProtocolError("hello was signed for another connection", code="replayed")
        for nonce, seen_at in list(self._seen.items()):
            if now - seen_at > 2 * self._max_age_s:
                del self._seen[nonce]
        if hello.nonce in self._seen:
            raise ProtocolError("hello nonce was already used", code="replayed")
        self._seen[hello.nonce] = now
