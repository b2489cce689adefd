"""Signed hellos: made for one peer and one connection, exchanged on a link's first stream, accepted once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mycellm import __version__
from mycellm.errors import MycellmError, PeerError, ProtocolError
from mycellm.identity.keys import NodeIdentity
from mycellm.network.messages import PROTOCOL_VERSION, ErrorMessage, HelloMessage, WireMessage, error_message
from mycellm.network.quic import FrameStream, PeerLink
from mycellm.types import ModelInfo, PeerId

logger = logging.getLogger(__name__)


HELLO_MAX_AGE_S = 120.0


HELLO_TIMEOUT_S = 5.0


Admitted = TypeVar("Admitted")


def make_hello(
    identity: NodeIdentity,
    to_peer_id: PeerId,
    binding: bytes,
    *,
    node_name: str,
    address: str | None,
    models: tuple[ModelInfo, ...],
    load: int,
    memberships: tuple[bytes, ...] = (),
    now: float | None = None,
) -> HelloMessage:
    unsigned = HelloMessage(
        peer_id=PeerId(identity.peer_id),
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
        memberships=memberships,
    )
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.signed_payload())})


class HelloChecker:
    """Accepts a hello only from the authenticated device, for this node and link, fresh and once."""

    def __init__(self, own_peer_id: PeerId, max_age_s: float = HELLO_MAX_AGE_S) -> None:
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
        if not math.isfinite(hello.sent_at):  # NaN is never "too old" by a comparison
            raise ProtocolError(f"hello time {hello.sent_at} is not a time", code="bad_hello")
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


async def accept_hello(
    link: PeerLink,
    stream: FrameStream,
    first: WireMessage | None,
    checker: HelloChecker,
    own_hello: Callable[[PeerLink], HelloMessage],
    admit: Callable[[HelloMessage], Admitted],
) -> tuple[HelloMessage, Admitted] | None:
    """Check the hello a peer opens its link with, ``admit`` it (the membership check), and answer it.

    None if refused: the peer gets an error frame and the link closes, before any other frame of it
    is read.
    """
    try:
        if not isinstance(first, HelloMessage):
            raise ProtocolError("the first message on a link must be a hello", code="unexpected")
        checker.check(first, link.certificate.device_public_key, link.binding)
        admitted = admit(first)
        stream.send(own_hello(link))
    except MycellmError as error:
        refuse(link, stream, error)
        return None
    return first, admitted


async def offer_hello(
    link: PeerLink,
    checker: HelloChecker,
    hello: HelloMessage,
    dialed_address: str,
    admit: Callable[[HelloMessage], Admitted],
) -> tuple[HelloMessage, Admitted, FrameStream]:
    """Open the control stream of a dialed link with ``hello``: the peer's checked and admitted hello."""
    control = link.open_stream()
    control.send(hello)
    reply = await control.receive(HELLO_TIMEOUT_S)
    if isinstance(reply, ErrorMessage):
        raise PeerError(f"{dialed_address} refused the hello: {reply.message}", code=f"peer_{reply.code}")
    if not isinstance(reply, HelloMessage):
        raise ProtocolError(f"{dialed_address} answered the hello with {reply!r}", code="unexpected")
    try:
        checker.check(reply, link.certificate.device_public_key, link.binding)
        admitted = admit(reply)
    except MycellmError as error:
        refuse(link, control, error)
        raise
    return reply, admitted, control


async def close_if_silent(
    link: PeerLink, greeted: Callable[[PeerLink], object | None], wait_s: float = HELLO_TIMEOUT_S
) -> None:
    """Close an inbound link that opened no stream (a hello, a join) within ``wait_s``: a peer that
    passed TLS and then says nothing must not hold one of the node's inbound slots."""
    if link.dialed:
        return
    await asyncio.sleep(wait_s)
    if not link.closed and not link.streams and greeted(link) is None:
        logger.warning("closing the silent link of %s: no hello within %.0f s", link.peer_id[:12], wait_s)
        link.close("no hello")


def refuse(link: PeerLink, stream: FrameStream, error: MycellmError) -> None:
    """Tell the peer why with an error frame, then close its link."""
    message = error_message(error)
    logger.warning("refused %s: %s", link.peer_id[:12], message.message)
    with contextlib.suppress(MycellmError):
        stream.send(message, end=True)
    # Let the error frame leave before the connection closes.
    asyncio.get_running_loop().call_later(0.2, link.close, f"refused: {message.message}"[:200])
