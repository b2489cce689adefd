"""Wire messages between nodes: frozen models, the kinds each stream may carry, error codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, cast

import cbor2
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mycellm.errors import (
    ContextLengthError,
    EngineError,
    FederationError,
    InvalidRequestError,
    MembershipError,
    ModelNotFoundError,
    MycellmError,
    PaymentRequiredError,
    PeerError,
    ProtocolError,
    ReceiptError,
    RequestCancelledError,
    UnsupportedParameterError,
)
from mycellm.network.wire_bounds import (
    MAX_SIGNED_VALUE_BYTES,
    MAX_TEXT_CHARS,
    WireBlob,
    WireModel,
    WireTime,
    WireToolCalls,
    check_embedding,
    check_generation,
)
from mycellm.types import (
    EmbeddingRequest,
    FinishReason,
    GenerationRequest,
    PeerId,
    Usage,
)

PROTOCOL_VERSION = 1


ALPN = "mycellm/1"


MAX_PEERS_PER_MESSAGE = 256


MAX_NETWORKS_PER_MESSAGE = 32


MAX_ADDRESS_RECORD_BYTES = 2048  # a full peer list stays far under the frame cap


WirePeerId = Annotated[PeerId, Field(pattern=r"^[0-9a-f]{64}$")]


# Every code is a key of WIRE_ERRORS below (mypy checks the keys, a test that none is missing).
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
    "usage_refused",
    "not_a_member",
    "join_refused",
    "too_many_streams",
    "stream_flooded",
    "too_many_requests",
    "internal",
]


class WireMessage(BaseModel):
    """Base of every frame body; ``kind`` names it on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str]


class HelloMessage(WireMessage):
    """First message of each side of a link: who I am, what I serve, signed for this link only."""

    kind: ClassVar[str] = "hello"
    peer_id: WirePeerId
    to_peer_id: WirePeerId
    node_name: str = Field(max_length=64)
    software_version: str = Field(max_length=32)
    protocol_version: int
    sent_at: WireTime
    nonce: bytes = Field(min_length=16, max_length=16)
    binding: bytes = Field(max_length=64)  # the link's original connection id: pins the hello to it
    address: str | None = Field(default=None, max_length=300)  # host:port where this node listens
    models: tuple[WireModel, ...] = Field(default=(), max_length=256)
    load: int = Field(default=0, ge=0)
    # The sender's membership certificates (signed by each network's authority), one per network.
    memberships: tuple[WireBlob, ...] = Field(default=(), max_length=MAX_NETWORKS_PER_MESSAGE)
    signature: bytes = Field(default=b"", max_length=64)

    def signed_payload(self) -> bytes:
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)


class PingMessage(WireMessage):
    kind: ClassVar[str] = "ping"
    seq: int = Field(ge=0)
    sent_at: WireTime


class PongMessage(WireMessage):
    kind: ClassVar[str] = "pong"
    seq: int = Field(ge=0)
    sent_at: WireTime
    load: int = Field(default=0, ge=0)


class InferenceMessage(WireMessage):
    kind: ClassVar[str] = "infer"
    request: Annotated[GenerationRequest, AfterValidator(check_generation)]
    # A paid request: the consumer's signed hold (``mycellm/ledger/spends.py``), and its latest
    # receipts and releases, so the seeder sees its chain's recent ends before gossip brings them.
    hold: WireBlob | None = None
    receipts: tuple[WireBlob, ...] = Field(default=(), max_length=8)
    releases: tuple[WireBlob, ...] = Field(default=(), max_length=8)


class EmbedMessage(WireMessage):
    kind: ClassVar[str] = "embed"
    request: Annotated[EmbeddingRequest, AfterValidator(check_embedding)]


class EmbeddingMessage(WireMessage):
    kind: ClassVar[str] = "embedding"
    vectors: tuple[Annotated[tuple[float, ...], Field(max_length=65536)], ...] = Field(max_length=4096)
    prompt_tokens: int = Field(ge=0)


class ChunkMessage(WireMessage):
    kind: ClassVar[str] = "chunk"
    text: str = Field(default="", max_length=MAX_TEXT_CHARS)
    tool_calls: WireToolCalls = ()


class DoneMessage(WireMessage):
    kind: ClassVar[str] = "done"
    text: str = Field(default="", max_length=MAX_TEXT_CHARS)
    tool_calls: WireToolCalls = ()
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
    receipts: tuple[WireBlob, ...] = Field(default=(), max_length=64)


SpendKind = Literal["hold", "release", "receipt"]


class FraudProofMessage(WireMessage):
    """Two statements of one account's spend chain that contradict each other
    (``mycellm/ledger/spends.py``): anyone can check them, and every node refuses the account."""

    kind: ClassVar[str] = "fraud"
    first_kind: SpendKind
    first: WireBlob
    second_kind: SpendKind
    second: WireBlob


class PeerAddress(BaseModel):
    """A peer's signed address record (``mycellm/network/peer_addresses.py``), relayed verbatim;
    ``peer_id`` lets a receiver skip peers it knows before checking any signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    peer_id: WirePeerId
    record: bytes = Field(max_length=MAX_ADDRESS_RECORD_BYTES)


class PeersRequestMessage(WireMessage):
    kind: ClassVar[str] = "peers?"


class PeersMessage(WireMessage):
    kind: ClassVar[str] = "peers"
    peers: tuple[PeerAddress, ...] = Field(default=(), max_length=MAX_PEERS_PER_MESSAGE)


MAX_LISTS_PER_MESSAGE = 64


class RevocationsMessage(WireMessage):
    """Signed revocation lists (each in its own canonical CBOR encoding)."""

    kind: ClassVar[str] = "revocations"
    lists: tuple[WireBlob, ...] = Field(default=(), max_length=MAX_LISTS_PER_MESSAGE)

    @classmethod
    def batches(cls, lists: list[bytes]) -> list[RevocationsMessage]:
        """``lists`` in as many messages as the cap per message asks for (a node may hold more)."""
        step = MAX_LISTS_PER_MESSAGE
        return [cls(lists=tuple(lists[start : start + step])) for start in range(0, len(lists), step)]


class JoinRequestMessage(WireMessage):
    """Instead of a hello, on a new link to a network's bootstrap: admit me, with this invite or none
    (a public network). ``network_id`` None asks for the authority's default network. With
    ``membership`` (the sender's current certificate, and no invite) it asks the authority to renew it."""

    kind: ClassVar[str] = "join?"
    invite: bytes | None = Field(default=None, max_length=8192)
    network_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    membership: bytes | None = Field(default=None, max_length=MAX_SIGNED_VALUE_BYTES)


class JoinedMessage(WireMessage):
    """The authority's answer to a join: the network's description and the new member's certificate
    (empty from a member that is not the authority: join at the description's bootstrap instead)."""

    kind: ClassVar[str] = "joined"
    description: bytes = Field(max_length=MAX_SIGNED_VALUE_BYTES)
    membership: bytes = Field(max_length=MAX_SIGNED_VALUE_BYTES)
    revocations: bytes | None = Field(default=None, max_length=MAX_SIGNED_VALUE_BYTES)


class NetworkNewsMessage(WireMessage):
    """Newer signed descriptions and member revocation lists of networks the two nodes share, and the
    sender's own renewed memberships of them (the link serves on with those; they are not passed on)."""

    kind: ClassVar[str] = "networks"
    descriptions: tuple[WireBlob, ...] = Field(default=(), max_length=MAX_NETWORKS_PER_MESSAGE)
    revocations: tuple[WireBlob, ...] = Field(default=(), max_length=MAX_NETWORKS_PER_MESSAGE)
    memberships: tuple[WireBlob, ...] = Field(default=(), max_length=MAX_NETWORKS_PER_MESSAGE)


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
        FraudProofMessage,
        JoinRequestMessage,
        JoinedMessage,
        NetworkNewsMessage,
    )
}


# What a node accepts on a session's control stream (after the hellos); anything else is answered
# with an "unexpected" error and the stream goes on.
CONTROL_KINDS: frozenset[str] = frozenset(
    message.kind
    for message in (
        PingMessage,
        PongMessage,
        PeersRequestMessage,
        PeersMessage,
        ReceiptsMessage,
        FraudProofMessage,
        RevocationsMessage,
        NetworkNewsMessage,
        ErrorMessage,
    )
)


# The first message of a stream a peer opens to ask something; any other kind is refused.
REQUEST_KINDS: frozenset[str] = frozenset(
    message.kind for message in (InferenceMessage, EmbedMessage, ReceiptOfferMessage)
)


@dataclass(frozen=True, slots=True)
class WireError:
    """What an error code stands for on the side that receives it."""

    error_type: type[MycellmError]
    # True: the request itself was at fault, and the requester raises ``error_type`` as is.
    # False: the route failed (a PeerError), so another route may still serve the request.
    request_fault: bool = False
    param: str | None = None


# The one table of error codes: what an error becomes on the wire, and what it means when it comes
# back. Several protocol codes stand for ProtocolError (a ProtocolError carries its own code).
WIRE_ERRORS: dict[ErrorCode, WireError] = {
    "bad_frame": WireError(ProtocolError),
    "too_large": WireError(ProtocolError),
    "unsupported_version": WireError(ProtocolError),
    "unknown_kind": WireError(ProtocolError),
    "unexpected": WireError(ProtocolError),
    "bad_hello": WireError(ProtocolError),
    "replayed": WireError(ProtocolError),
    "invalid_request": WireError(InvalidRequestError, request_fault=True),
    "context_length": WireError(ContextLengthError, request_fault=True),
    "unsupported_parameter": WireError(UnsupportedParameterError, request_fault=True),
    # A model the peer no longer has means our view of it is stale: another route may serve it.
    "model_not_found": WireError(ModelNotFoundError),
    "engine_error": WireError(EngineError),
    "cancelled": WireError(RequestCancelledError, request_fault=True),
    "insufficient_credits": WireError(PaymentRequiredError, request_fault=True, param="balance"),
    "receipt_refused": WireError(ReceiptError, request_fault=True),
    "usage_refused": WireError(ProtocolError),  # a consumer's word to its seeder, on the control stream
    # A peer that is not (or no longer) in the request's network: another route may serve it.
    "not_a_member": WireError(FederationError),
    "join_refused": WireError(MembershipError, request_fault=True),
    # A peer over one of this node's caps: the route is busy, another may serve the request.
    "too_many_streams": WireError(ProtocolError),
    "stream_flooded": WireError(ProtocolError),
    "too_many_requests": WireError(ProtocolError),
    "internal": WireError(MycellmError),  # anything else; its details stay on the node
}


_CODE_OF_TYPE: dict[type[BaseException], ErrorCode] = {
    wire.error_type: code for code, wire in WIRE_ERRORS.items() if wire.error_type is not ProtocolError
}


def error_message(error: BaseException) -> ErrorMessage:
    """The error frame that tells a peer why its request failed."""
    if isinstance(error, ProtocolError):
        code = error.code if error.code in WIRE_ERRORS else "bad_frame"
        return ErrorMessage(code=cast(ErrorCode, code), message=error.message[:2000])
    # The most specific class that has a code (ContextLengthError before InvalidRequestError).
    wire_code: ErrorCode = next(
        (_CODE_OF_TYPE[cls] for cls in type(error).__mro__ if cls in _CODE_OF_TYPE), "internal"
    )
    if wire_code == "internal" or not isinstance(error, MycellmError):
        return ErrorMessage(code="internal", message=f"internal error: {type(error).__name__}")
    return ErrorMessage(code=wire_code, message=error.message[:2000])


def error_from_message(message: ErrorMessage, peer_id: PeerId) -> MycellmError:
    """A peer's error frame as the local error it stands for; route failures become PeerError."""
    text = f"peer {peer_id[:12]}: {message.message}"
    wire = WIRE_ERRORS[message.code]
    if wire.request_fault:
        return wire.error_type(text, param=wire.param)
    return PeerError(text, code=None if message.code == "engine_error" else f"peer_{message.code}")
