"""Wire codec: frames round-trip, caps are checked before decoding, bad frames get typed errors; hellos."""

from __future__ import annotations

import os
import re
import struct
import time
from pathlib import Path
from typing import get_args

import cbor2
import pytest

from mycellm.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    PaymentRequiredError,
    PeerError,
    ProtocolError,
    ReceiptError,
    RequestCancelledError,
    UnsupportedParameterError,
    UpstreamError,
)
from mycellm.identity.keys import load_or_create_identity
from mycellm.network.codec import HEADER, FrameReader, decode_body, encode_frame
from mycellm.network.hello import HelloChecker, make_hello
from mycellm.network.messages import (
    CONTROL_KINDS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REQUEST_KINDS,
    WIRE_ERRORS,
    CancelMessage,
    ChunkMessage,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    InferenceMessage,
    PeerAddress,
    PeersMessage,
    PingMessage,
    error_from_message,
    error_message,
)
from mycellm.types import GenerationRequest, ModelInfo, Usage


def _raw(envelope: object) -> bytes:
    body = cbor2.dumps(envelope)
    return HEADER.pack(len(body)) + body


def _decode_all(data: bytes, max_bytes: int = 1 << 20) -> list[object]:
    return list(FrameReader(max_bytes).feed(data))


def test_every_message_kind_round_trips_through_frames() -> None:
    request = GenerationRequest(
        request_id="r-1",
        model="m",
        messages=({"role": "user", "content": "hi"},),
        max_tokens=8,
        continuation="Hel",
    )
    messages = [
        PingMessage(seq=1, sent_at=1.5),
        InferenceMessage(request=request),
        ChunkMessage(text="héllo"),
        DoneMessage(text="!", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=4)),
        ErrorMessage(code="engine_error", message="boom"),
        CancelMessage(reason="client left"),
        PeersMessage(peers=(PeerAddress(peer_id="a" * 64, record=b"a signed address record"),)),
    ]
    stream = b"".join(encode_frame(message) for message in messages)
    # Delivered in arbitrary pieces, the reader reassembles the same messages.
    reader, decoded = FrameReader(), []
    for start in range(0, len(stream), 7):
        decoded.extend(reader.feed(stream[start : start + 7]))
    assert decoded == messages
    assert reader.pending_bytes == 0
    assert decoded[1].request.continuation == "Hel"


def test_a_length_over_the_cap_is_refused_before_the_body_arrives() -> None:
    reader = FrameReader(max_bytes=4096)
    # Only the header: the reader must refuse without waiting for (or buffering) 2 GiB.
    items = list(reader.feed(struct.pack("!I", 2**31)))
    assert len(items) == 1 and isinstance(items[0], ProtocolError)
    assert items[0].code == "too_large" and not items[0].recoverable
    assert reader.pending_bytes == 0
    assert list(reader.feed(encode_frame(PingMessage(seq=1, sent_at=0)))) == []  # the stream is dead


def test_encode_refuses_a_frame_over_the_cap() -> None:
    with pytest.raises(ProtocolError, match="over the 4096-byte cap"):
        encode_frame(ChunkMessage(text="x" * 5000), max_bytes=4096)


@pytest.mark.parametrize(
    ("envelope", "code", "fragment"),
    [
        (
            {"v": PROTOCOL_VERSION, "k": "teleport", "b": {}},
            "unknown_kind",
            "unknown message kind 'teleport'",
        ),
        ({"v": 99, "k": "ping", "b": {"seq": 1, "sent_at": 0.0}}, "unsupported_version", "version 99"),
        ({"v": PROTOCOL_VERSION, "k": "ping", "b": {"seq": -1, "sent_at": 0.0}}, "bad_frame", "ping.seq"),
        (
            {"v": PROTOCOL_VERSION, "k": "ping", "b": {"seq": 1, "sent_at": 0.0, "x": 1}},
            "bad_frame",
            "ping.x",
        ),
        ({"v": PROTOCOL_VERSION, "k": "ping", "b": [1, 2]}, "bad_frame", "not a map"),
        ({"v": PROTOCOL_VERSION, "k": "ping"}, "bad_frame", "map of v, k and b"),
        ([1, 2, 3], "bad_frame", "map of v, k and b"),
    ],
)
def test_bad_frames_give_typed_recoverable_errors(envelope: object, code: str, fragment: str) -> None:
    items = _decode_all(_raw(envelope) + encode_frame(PingMessage(seq=7, sent_at=0)))
    assert isinstance(items[0], ProtocolError)
    assert items[0].code == code and items[0].recoverable
    assert fragment in items[0].message
    assert items[1] == PingMessage(seq=7, sent_at=0)  # framing intact: the next frame still reads


def test_garbage_bytes_are_a_bad_frame() -> None:
    garbage = os.urandom(64)
    items = _decode_all(HEADER.pack(len(garbage)) + b"\xff" + garbage[1:])
    assert isinstance(items[0], ProtocolError) and items[0].code == "bad_frame"


def test_decode_body_refuses_deep_nesting() -> None:
    nested: object = 1
    for _ in range(100):
        nested = [nested]
    with pytest.raises(ProtocolError):
        decode_body(cbor2.dumps({"v": 1, "k": "ping", "b": nested}))


def test_every_kind_has_a_unique_name() -> None:
    assert len(MESSAGE_TYPES) == 20
    assert all(kind == message.kind for kind, message in MESSAGE_TYPES.items())


def test_errors_cross_the_wire_with_their_meaning() -> None:
    assert error_message(ContextLengthError("too long")).code == "context_length"
    assert error_message(InvalidRequestError("bad")).code == "invalid_request"
    assert error_message(EngineError("down")).code == "engine_error"
    assert error_message(RuntimeError("secret detail")).message == "internal error: RuntimeError"
    peer = "b" * 64
    assert isinstance(
        error_from_message(ErrorMessage(code="context_length", message="x"), peer), ContextLengthError
    )
    assert isinstance(
        error_from_message(ErrorMessage(code="invalid_request", message="x"), peer), InvalidRequestError
    )
    lost = error_from_message(ErrorMessage(code="engine_error", message="x"), peer)
    assert isinstance(lost, PeerError) and lost.status == 503
    # A model the peer no longer has is the route's fault: another route may serve it.
    assert isinstance(error_from_message(ErrorMessage(code="model_not_found", message="x"), peer), PeerError)


def test_every_error_code_has_one_meaning_in_the_table() -> None:
    assert set(get_args(ErrorCode)) == set(WIRE_ERRORS)
    # Each error class but ProtocolError (which carries its own code) stands for one code only.
    classes = [wire.error_type for wire in WIRE_ERRORS.values() if wire.error_type is not ProtocolError]
    assert len(classes) == len(set(classes))
    for code, wire in WIRE_ERRORS.items():
        back = error_from_message(ErrorMessage(code=code, message="x"), "b" * 64)
        assert isinstance(back, wire.error_type if wire.request_fault else PeerError), code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ContextLengthError("x"), "context_length"),
        (UnsupportedParameterError("x"), "unsupported_parameter"),
        (InvalidRequestError("x"), "invalid_request"),
        (RequestCancelledError("x"), "cancelled"),
        (PaymentRequiredError("x", param="balance"), "insufficient_credits"),
        (ReceiptError("x"), "receipt_refused"),
        (UpstreamError("x"), "engine_error"),
        (PeerError("x"), "engine_error"),
        (ProtocolError("x", code="replayed"), "replayed"),
        (ProtocolError("x", code="no_such_code"), "bad_frame"),
    ],
)
def test_an_error_and_its_frame_mean_the_same_on_both_sides(error: Exception, code: str) -> None:
    message = error_message(error)
    assert message.code == code and message.message == "x"
    back = error_from_message(message, "b" * 64)
    if WIRE_ERRORS[message.code].request_fault:
        assert type(back) is type(error) and back.param == getattr(error, "param", None)
    else:  # the route failed: another route may still serve the request
        assert isinstance(back, PeerError)


def test_each_stream_declares_the_kinds_it_accepts() -> None:
    assert set(MESSAGE_TYPES).issuperset(CONTROL_KINDS | REQUEST_KINDS)
    assert CONTROL_KINDS.isdisjoint(REQUEST_KINDS)
    assert sorted(REQUEST_KINDS) == ["embed", "infer", "receipt?"]
    # A hello opens a link and answers never open a stream; neither is a control message.
    answers = {"hello", "chunk", "done", "embedding", "receipt", "cancel"}
    assert answers.isdisjoint(CONTROL_KINDS | REQUEST_KINDS)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("wire-ids")
    return [load_or_create_identity(root / name, node_name=name) for name in ("a", "b")]


def test_a_hello_is_accepted_once_for_its_link(identities) -> None:
    a, b = identities
    binding = os.urandom(8)
    hello = make_hello(
        a,
        b.peer_id,
        binding,
        node_name="a",
        address="127.0.0.1:1",
        models=(ModelInfo(name="m", backend="x"),),
        load=2,
    )
    checker = HelloChecker(b.peer_id)
    checker.check(hello, a.device_public_key, binding)
    with pytest.raises(ProtocolError, match="already used") as replay:
        checker.check(hello, a.device_public_key, binding)
    assert replay.value.code == "replayed"


@pytest.mark.parametrize(
    ("mutate", "code", "fragment"),
    [
        (lambda hello, a, b: (hello, b.device_public_key, hello.binding), "bad_hello", "another peer"),
        (lambda hello, a, b: (hello, a.device_public_key, b"other-link"), "replayed", "another connection"),
        (
            lambda hello, a, b: (hello.model_copy(update={"load": 0}), a.device_public_key, hello.binding),
            "bad_hello",
            "signature",
        ),
        (
            lambda hello, a, b: (
                hello.model_copy(update={"sent_at": time.time() - 3600}),
                a.device_public_key,
                hello.binding,
            ),
            "bad_hello",
            "signature",
        ),
    ],
)
def test_hello_refusals(identities, mutate, code: str, fragment: str) -> None:
    a, b = identities
    hello = make_hello(a, b.peer_id, b"link-1", node_name="a", address=None, models=(), load=5)
    checker = HelloChecker(b.peer_id)
    with pytest.raises(ProtocolError, match=fragment) as refused:
        checker.check(*mutate(hello, a, b))
    assert refused.value.code == code


def test_a_stale_or_misaddressed_hello_is_refused(identities) -> None:
    a, b = identities
    old = make_hello(
        a, b.peer_id, b"l", node_name="a", address=None, models=(), load=0, now=time.time() - 600
    )
    with pytest.raises(ProtocolError, match="old") as stale:
        HelloChecker(b.peer_id).check(old, a.device_public_key, b"l")
    assert stale.value.code == "replayed"
    elsewhere = make_hello(a, a.peer_id, b"l", node_name="a", address=None, models=(), load=0)
    with pytest.raises(ProtocolError, match="addressed to another node"):
        HelloChecker(b.peer_id).check(elsewhere, a.device_public_key, b"l")


@pytest.mark.parametrize("sent_at", [float("nan"), float("inf"), float("-inf")])
def test_a_hello_whose_time_is_not_a_number_is_refused(identities, sent_at: float) -> None:
    a, b = identities
    fresh = make_hello(a, b.peer_id, b"link-1", node_name="a", address=None, models=(), load=0)
    unsigned = fresh.model_copy(update={"sent_at": sent_at, "signature": b""})
    hello = unsigned.model_copy(update={"signature": a.sign(unsigned.signed_payload())})
    with pytest.raises(ProtocolError, match="not a time") as refused:
        HelloChecker(b.peer_id).check(hello, a.device_public_key, b"link-1")
    assert refused.value.code == "bad_hello"
    # On the wire such a time is not even a hello.
    with pytest.raises(ProtocolError, match=r"hello\.sent_at") as undecodable:
        decode_body(cbor2.dumps({"v": PROTOCOL_VERSION, "k": "hello", "b": unsigned.model_dump()}))
    assert undecodable.value.code == "bad_frame"


_LONG = "x" * 5000
_REQUEST = {"request_id": "r", "model": "m", "messages": [{"role": "user", "content": "hi"}]}


# For each kind, a body whose one over-long (or not finite) field is named by the second item.
OVER_LONG: list[tuple[str, dict[str, object], str]] = [
    ("hello", {"peer_id": "a" * 65}, "peer_id"),
    ("ping", {"seq": 1, "sent_at": float("nan")}, "sent_at"),
    ("pong", {"seq": 1, "sent_at": float("inf")}, "sent_at"),
    ("infer", {"request": {**_REQUEST, "request_id": _LONG}}, "request"),
    ("infer", {"request": {**_REQUEST, "model": _LONG}}, "request"),
    ("infer", {"request": {**_REQUEST, "network_id": "a" * 65}}, "request"),
    ("infer", {"request": {**_REQUEST, "stop": ["s"] * 17}}, "request"),
    ("embed", {"request": {"request_id": _LONG, "model": "m", "inputs": ["hi"]}}, "request"),
    ("embedding", {"vectors": [[0.0]] * 4097, "prompt_tokens": 1}, "vectors"),
    ("chunk", {"text": "x" * ((1 << 20) + 1)}, "text"),
    ("chunk", {"tool_calls": [{"id": _LONG, "name": "f", "arguments": "{}"}]}, "tool_calls"),
    (
        "done",
        {
            "tool_calls": [{"id": "c", "name": _LONG, "arguments": "{}"}],
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        },
        "tool_calls",
    ),
    ("error", {"code": "internal", "message": _LONG}, "message"),
    ("cancel", {"reason": _LONG}, "reason"),
    ("peers", {"peers": [{"peer_id": "a" * 64, "record": b"x" * 2049}]}, "peers"),
    ("peers", {"peers": [{"peer_id": "a" * 64, "record": b""}] * 257}, "peers"),
    ("peers", {"peers": [{"peer_id": "a" * 64, "address": "127.0.0.1:9"}]}, "peers"),  # unsigned
    ("revocations", {"lists": [b"x" * 65537]}, "lists"),
    ("receipt?", {"terms": b"x" * 32769, "consumer_signature": b"s" * 64}, "terms"),
    ("receipt", {"receipt": b"x" * 65537}, "receipt"),
    ("receipts", {"receipts": [b"x" * 65537]}, "receipts"),
    ("fraud", {"first_kind": "hold", "first": b"x" * 65537, "second_kind": "hold", "second": b""}, "first"),
    ("infer", {"request": _REQUEST, "hold": b"x" * 65537}, "hold"),
    ("infer", {"request": _REQUEST, "receipts": [b""] * 9}, "receipts"),
    ("join?", {"network_id": "a" * 65}, "network_id"),
    ("joined", {"description": b"x" * 65537, "membership": b""}, "description"),
    ("networks", {"descriptions": [b"x" * 65537]}, "descriptions"),
]


def _hello_body(identities, **fields: object) -> dict[str, object]:
    a, b = identities
    hello = make_hello(a, b.peer_id, b"link-1", node_name="a", address=None, models=(), load=0)
    return {**hello.model_dump(), **fields}


@pytest.mark.parametrize(("kind", "body", "field"), OVER_LONG, ids=[f"{k}.{f}" for k, _, f in OVER_LONG])
def test_an_over_long_field_of_any_message_is_refused_with_a_typed_error(
    identities, kind: str, body: dict[str, object], field: str
) -> None:
    if kind == "hello":
        body = _hello_body(identities, **body)
    with pytest.raises(ProtocolError, match=rf"^{re.escape(kind)}\.{field}") as refused:
        decode_body(cbor2.dumps({"v": PROTOCOL_VERSION, "k": kind, "b": body}))
    assert refused.value.code == "bad_frame"


def test_every_kind_but_the_empty_one_has_an_over_long_case() -> None:
    assert {kind for kind, _, _ in OVER_LONG} == set(MESSAGE_TYPES) - {"peers?"}


def test_the_models_of_a_hello_have_bounded_names(identities) -> None:
    body = _hello_body(identities, models=[{"name": _LONG, "backend": "x"}])
    with pytest.raises(ProtocolError, match=r"^hello\.models") as refused:
        decode_body(cbor2.dumps({"v": PROTOCOL_VERSION, "k": "hello", "b": body}))
    assert refused.value.code == "bad_frame"
