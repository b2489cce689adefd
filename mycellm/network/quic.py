"""aioquic glue: a QUIC endpoint whose links are mutually authenticated by device certificates.

Each end presents an X.509 certificate self-signed with its device key that carries its CBOR
device certificate in an extension. TLS 1.3 proves that the other end holds the certificate's
key (CertificateVerify); ``peer_certificate`` then checks that this key is the device key of a
device certificate signed by an account key and still valid, and ``check_peer`` (revocation,
network membership) has the last word. Nothing the peer sends is read before that passed.

aioquic 1.7 does not ask clients for a certificate and accepts a client that sends none: the server
turns on its private ``_request_client_certificate`` switch (the version is pinned) and refuses a
link without a verified certificate. One QUIC stream carries one request, in wire frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from mycellm.errors import IdentityError, PeerError, ProtocolError
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.network.codec import FrameReader, encode_frame
from mycellm.network.frame_stream import FrameStream
from mycellm.network.limits import BoundedServer, LinkLimits
from mycellm.network.liveness import ConnectedSend, Liveness
from mycellm.network.messages import ALPN, error_message
from mycellm.network.tls import peer_certificate, request_client_certificate, tls_certificate
from mycellm.types import PeerId

logger = logging.getLogger(__name__)

REFUSED = 0x4D01  # application close code: the peer's identity was refused
GOING_AWAY = 0x4D02  # application close code: orderly close (shutdown, duplicate link, dead peer)

PeerCheck = Callable[[DeviceCertificate], None]
StreamHandler = Callable[["PeerLink", "FrameStream"], Awaitable[None]]
LinkHandler = Callable[["PeerLink"], Any]


class PeerLink:
    """An authenticated QUIC connection to one peer."""

    def __init__(self, protocol: _LinkProtocol, certificate: DeviceCertificate, dialed: bool) -> None:
        self._protocol = protocol
        self.certificate = certificate
        self.peer_id = PeerId(certificate.peer_id)
        self.dialed = dialed
        self.limits = protocol.limits
        self.max_frame_bytes = protocol.limits.max_frame_bytes
        self.binding: bytes = protocol._quic.original_destination_connection_id
        address = protocol._quic._network_paths[0].addr if protocol._quic._network_paths else ("?", 0)
        self.remote_address: tuple[str, int] = (str(address[0]).removeprefix("::ffff:"), int(address[1]))
        self.streams: dict[int, FrameStream] = {}
        self.liveness = protocol.liveness
        self.closed, self.close_reason = False, ""
        self._closed_event = asyncio.Event()

    def open_stream(self) -> FrameStream:
        if self.closed:
            raise PeerError(f"link to {self.peer_id[:12]} is closed: {self.close_reason}")
        stream_id = self._protocol._quic.get_next_available_stream_id()
        stream = FrameStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def _accept_stream(self, stream_id: int) -> FrameStream:
        """A stream the peer opened."""
        stream = FrameStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def send_raw(self, stream_id: int, data: bytes, end: bool) -> None:
        if self.closed:
            raise PeerError(f"link to {self.peer_id[:12]} is closed: {self.close_reason}")
        try:
            self._protocol._quic.send_stream_data(stream_id, data, end)
        except (RuntimeError, ValueError) as error:  # the stream is finished or was stopped by the peer
            raise PeerError(f"stream {stream_id} to {self.peer_id[:12]}: {error}") from error
        if end:
            self._forget_if_done(stream_id)
        self._protocol.transmit()

    def reset_stream(self, stream_id: int) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):  # a stream aioquic already finished cannot be reset
                self._protocol._quic.reset_stream(stream_id, GOING_AWAY)
                self._protocol.transmit()
        self._release(stream_id)

    def peer_streams(self) -> int:
        """Streams the peer opened on this link that are still open here."""
        is_client = self.dialed
        return sum(1 for stream_id in self.streams if not _locally_initiated(stream_id, is_client))

    def _release(self, stream_id: int) -> None:
        """Forget a stream this node is done with: what the peer still sends on it is dropped."""
        self.streams.pop(stream_id, None)
        self._protocol._forget(stream_id, stop=False)

    def close(self, reason: str = "closing", code: int = GOING_AWAY) -> None:
        if not self.closed:
            self._protocol._quic.close(error_code=code, reason_phrase=reason)
            self._protocol.transmit()
            self._mark_closed(reason)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        error = PeerError(f"link to {self.peer_id[:12]} closed: {reason}")
        for stream in self.streams.values():
            stream._deliver(error)
        self.streams.clear()
        self._closed_event.set()

    def _forget_if_done(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream._ended and stream._done:
            del self.streams[stream_id]
            self._protocol._forget(stream_id, stop=False)


class _LinkProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, *, endpoint: QuicEndpoint, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._endpoint = endpoint
        self.limits = endpoint.limits
        self.link: PeerLink | None = None
        self.verified: asyncio.Future[PeerLink] = asyncio.get_running_loop().create_future()
        self.verified.add_done_callback(
            lambda done: done.cancelled() or done.exception()
        )  # read: nobody waits
        self._readers: dict[int, FrameReader] = {}
        self._finished: set[int] = set()  # peer streams this node is done with that aioquic still has
        self.liveness = Liveness()  # any datagram of the peer (an ACK is one): it is alive
        if not quic.configuration.is_client:
            request_client_certificate(quic)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.liveness.saw()
        super().datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:  # a connected socket hears ICMP unreachable
        self.liveness.refused() if isinstance(exc, ConnectionRefusedError) else None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._authenticate()
        elif isinstance(event, events.StreamDataReceived):
            if self.link is not None and not self.link.closed:
                self._stream_data(self.link, event)
        elif isinstance(event, events.StreamReset):
            if self.link is not None:
                stream = self.link.streams.pop(event.stream_id, None)
                self._forget(event.stream_id, stop=False)
                if stream is not None:
                    stream._deliver(PeerError(f"{self.link.peer_id[:12]} reset stream {event.stream_id}"))
        elif isinstance(event, events.ConnectionTerminated):
            reason = event.reason_phrase or f"error code {event.error_code:#x}"
            self._endpoint._protocols.discard(self)
            self._readers.clear()
            if not self.verified.done():
                self.verified.set_exception(PeerError(f"connection refused or lost: {reason}"))
            if self.link is not None:
                self.link._mark_closed(reason)
                self._endpoint._link_closed(self.link)
            if self._quic.configuration.is_client and self._transport is not None:
                self._transport.close()  # a dialed link's own socket (a served one shares the server's)

    def _authenticate(self) -> None:
        try:
            device = peer_certificate(self._quic.tls._peer_certificate)
            inbound = sum(1 for link in self._endpoint.links if not link.dialed)
            if not self._quic.configuration.is_client and inbound >= self.limits.max_inbound_links:
                raise IdentityError(f"busy: {inbound} inbound links, the most this node keeps")
            self._endpoint.check_peer(device)
        except IdentityError as error:
            logger.warning("refused a QUIC peer: %s", error.message)
            self._quic.close(error_code=REFUSED, reason_phrase=f"refused: {error.message}"[:200])
            self.transmit()
            if not self.verified.done():
                self.verified.set_exception(PeerError(f"peer refused: {error.message}", code="peer_refused"))
            return
        self.link = PeerLink(self, device, dialed=self._quic.configuration.is_client)
        self._endpoint._link_opened(self.link)
        if not self.verified.done():
            self.verified.set_result(self.link)

    def _stream_data(self, link: PeerLink, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        stream = link.streams.get(stream_id)
        if stream is None:
            if stream_id in self._finished or _locally_initiated(stream_id, link.dialed):
                return  # data for a stream we already closed: drop it
            if link.peer_streams() >= self.limits.max_streams_per_link:
                error = f"over {self.limits.max_streams_per_link} streams open on this link"
                self._refuse(link, stream_id, ProtocolError(error, code="too_many_streams"))
                return
            stream = link._accept_stream(stream_id)
            self._endpoint._stream_opened(link, stream)
        reader = self._readers.setdefault(stream_id, FrameReader(self.limits.max_frame_bytes))
        for item in reader.feed(event.data):
            if not isinstance(item, ProtocolError) and stream._overflows(
                reader.frame_bytes, reader.pending_bytes, self.limits
            ):
                flooded = ProtocolError("over the frames or bytes a stream may queue", code="stream_flooded")
                self._refuse(link, stream_id, flooded, stream)
                return
            if isinstance(item, ProtocolError):
                # The peer is told at once; nothing that breaks the protocol reaches the handler.
                with contextlib.suppress(Exception):
                    stream.send(error_message(item), end=not item.recoverable)
                stream._deliver(item)  # the reader learns of it too (a request stream then ends)
                if not item.recoverable:
                    link.reset_stream(stream_id)
                    return
            else:
                stream._deliver(item, reader.frame_bytes)
        if event.end_stream:
            stream._deliver(None)
            self._readers.pop(stream_id, None)
            link._forget_if_done(stream_id)

    def _refuse(
        self, link: PeerLink, stream_id: int, error: ProtocolError, stream: FrameStream | None = None
    ) -> None:
        """Answer a stream over a cap with ``error`` and stop reading it; the link goes on."""
        with contextlib.suppress(Exception):
            link.send_raw(stream_id, encode_frame(error_message(error), self.limits.max_frame_bytes), True)
        if stream is not None:
            stream._ended = True
            stream._deliver(error)  # the handler learns of it (it is not recoverable)
        link._release(stream_id)
        link._protocol._forget(stream_id, stop=True)

    def _forget(self, stream_id: int, stop: bool) -> None:
        """Drop a stream's reader; remember it as finished while aioquic still keeps it."""
        self._readers.pop(stream_id, None)
        if _locally_initiated(stream_id, self._quic.configuration.is_client):
            return
        if stop:
            with contextlib.suppress(Exception):  # ask the peer to stop sending on it
                self._quic.stop_stream(stream_id, GOING_AWAY)
                self.transmit()
        self._finished.add(stream_id)
        if len(self._finished) > 2 * self.limits.max_streams_per_link:
            self._finished = {item for item in self._finished if item in self._quic._streams}


def _locally_initiated(stream_id: int, is_client: bool) -> bool:
    return (stream_id & 1) == (0 if is_client else 1)


class QuicEndpoint:
    """Listens and dials; hands each authenticated link's incoming streams to ``on_stream``."""

    def __init__(
        self,
        identity: NodeIdentity,
        *,
        on_stream: StreamHandler,
        check_peer: PeerCheck | None = None,
        on_link: LinkHandler | None = None,
        on_link_closed: LinkHandler | None = None,
        limits: LinkLimits | None = None,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.identity = identity
        self.limits = limits or LinkLimits()
        self.max_frame_bytes = self.limits.max_frame_bytes
        self.check_peer: PeerCheck = check_peer or (lambda _device: None)
        self._on_stream = on_stream
        self._on_link = on_link
        self._on_link_closed = on_link_closed
        self._idle_timeout_s = idle_timeout_s
        self._certificate = tls_certificate(identity)
        self._server: QuicServer | None = None
        self._protocols: set[_LinkProtocol] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.links: set[PeerLink] = set()
        self.inbound_peak = 0  # the most inbound links held at once since start

    def _configuration(self, is_client: bool, server_name: str | None = None) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,  # chain checks are ours: peer_certificate and check_peer
            idle_timeout=self._idle_timeout_s,
            max_datagram_frame_size=None,
            certificate=self._certificate,
            private_key=self.identity.device_key,
            server_name=server_name,
        )

    def _protocol(self, quic: QuicConnection, **kwargs: Any) -> _LinkProtocol:
        protocol = _LinkProtocol(quic, endpoint=self, **kwargs)
        self._protocols.add(protocol)
        return protocol

    async def listen(self, host: str, port: int) -> int:
        """Start the server; returns the UDP port it bound (``port`` 0 picks a free one)."""
        configuration = self._configuration(False)
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: BoundedServer(
                self._handshakes_room, configuration=configuration, create_protocol=self._protocol
            ),
            local_addr=(host, port),
        )
        self._server = server
        transport = cast(asyncio.DatagramTransport, transport)
        return int(transport.get_extra_info("sockname")[1])

    async def connect(self, host: str, port: int, timeout_s: float = 5.0) -> PeerLink:
        """Dial a peer and return the link once both certificates are verified."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), timeout_s)
        except (OSError, TimeoutError) as error:
            raise PeerError(f"cannot resolve {host}:{port}: {error}") from error
        family, _, _, _, address = infos[0]
        quic = QuicConnection(configuration=self._configuration(True, server_name=host))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.connect(address)  # so a dead peer's host can tell this node at once (ICMP)
            transport, protocol = await loop.create_datagram_endpoint(lambda: self._protocol(quic), sock=sock)
            protocol._transport = ConnectedSend(transport)  # type: ignore[assignment]
        except OSError as error:
            sock.close()
            raise PeerError(f"cannot open a UDP socket: {error}") from error
        link_protocol = cast(_LinkProtocol, protocol)
        try:
            link_protocol.connect(address)
            return await asyncio.wait_for(asyncio.shield(link_protocol.verified), timeout_s)
        except TimeoutError as error:
            link_protocol.close()
            raise PeerError(f"no QUIC handshake with {host}:{port} within {timeout_s} s") from error
        except BaseException:
            link_protocol.close()
            raise

    def _link_opened(self, link: PeerLink) -> None:
        self.links.add(link)
        self.inbound_peak = max(self.inbound_peak, sum(1 for held in self.links if not held.dialed))
        if self._on_link is not None:
            self._spawn(self._on_link(link))

    def _link_closed(self, link: PeerLink) -> None:
        self.links.discard(link)
        if self._on_link_closed is not None:
            self._spawn(self._on_link_closed(link))

    def _handshakes_room(self) -> bool:
        """Whether a new connection may start its handshake (those under way are within the cap)."""
        pending = sum(1 for item in self._protocols if not item.verified.done())
        return pending < self.limits.max_handshaking

    def _stream_opened(self, link: PeerLink, stream: FrameStream) -> None:
        self._spawn(self._serve_stream(link, stream))

    async def _serve_stream(self, link: PeerLink, stream: FrameStream) -> None:
        try:
            await self._on_stream(link, stream)
        finally:
            if stream._ended:  # answered: whatever else the peer sends on it is dropped
                link._release(stream.stream_id)

    def _spawn(self, result: Any) -> None:
        if asyncio.iscoroutine(result):
            task = asyncio.get_running_loop().create_task(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for link in list(self.links):
            link.close("shutting down")
        for protocol in list(self._protocols):
            with contextlib.suppress(Exception):
                protocol.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
