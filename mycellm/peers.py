"""PeerService: the links of a node to its peers (hello, heartbeats, reconnects, peer exchange, revocations).

Ray-free: the PeerManager actor wraps one PeerService; tests and benchmarks drive it directly.
Requests over the links (both ways) are ``mycellm.forwarding``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mycellm.config import NodeSettings, join_address, split_address
from mycellm.devices import RevocationList
from mycellm.dialer import Dialer
from mycellm.errors import IdentityError, MycellmError, PeerError, ProtocolError
from mycellm.forwarding import Forwarder, LocalServer
from mycellm.identity import DeviceCertificate, NodeIdentity
from mycellm.ledger.pricing import PriceTable
from mycellm.peer_registry import PeerRecord, PeerRegistry
from mycellm.revocation_keeper import RevocationKeeper
from mycellm.settlement import CreditKeeper, Settler
from mycellm.transport.quic import FrameStream, PeerLink, QuicEndpoint
from mycellm.wire import (
    ErrorMessage,
    HelloChecker,
    HelloMessage,
    PeerAddress,
    PeersMessage,
    PeersRequestMessage,
    PingMessage,
    PongMessage,
    ReceiptsMessage,
    RevocationsMessage,
    WireMessage,
    error_message,
    make_hello,
)

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 5.0
REGISTRY_FILE = "peers.json"


@dataclass
class Session:
    """A link whose hellos have been exchanged and checked."""

    link: PeerLink
    hello: HelloMessage
    control: FrameStream
    address: str | None  # where the peer listens, as it said or as we dialed it
    pings: dict[int, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    @property
    def peer_id(self) -> str:
        return self.link.peer_id


class PeerService:
    def __init__(
        self,
        settings: NodeSettings,
        identity: NodeIdentity,
        local: LocalServer,
        *,
        on_change: Callable[[], None] | None = None,
        keeper: CreditKeeper | None = None,
    ) -> None:
        self._settings = settings
        self.identity = identity
        self.peer_id = identity.peer_id
        self._local = local
        self._on_change = on_change or (lambda: None)
        data_dir = settings.resolved_data_dir
        self.registry = PeerRegistry(data_dir / REGISTRY_FILE, settings.credits.reputation_half_life_s)
        self.revocations = RevocationKeeper(data_dir)
        self._hellos = HelloChecker(self.peer_id)
        self.endpoint = QuicEndpoint(
            identity,
            on_stream=self._on_stream,
            check_peer=self._check_peer,
            on_link_closed=self._on_link_closed,
            max_frame_bytes=settings.max_frame_bytes,
            idle_timeout_s=max(30.0, settings.heartbeat_interval_s * (settings.heartbeat_misses + 2)),
        )
        # Without a keeper the links carry no payments (tools, tests of the transport).
        self.settler = (
            Settler(identity, PriceTable(settings.credits), settings.network_id, keeper, self.registry)
            if keeper is not None
            else None
        )
        if self.settler is not None:
            self.settler.publish = self._publish_receipt
        self.forwarder = Forwarder(self, local, settings.stream_interval_s, self.settler)
        self.sessions: dict[str, Session] = {}
        self._by_link: dict[PeerLink, Session] = {}
        self._dialer = Dialer(self._wanted, self._dial, settings.reconnect_max_backoff_s)
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self.address: str | None = settings.resolved_advertise_address
        self.port = 0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        self.port = await self.endpoint.listen(self._settings.resolved_quic_host, self._settings.quic_port)
        if self.address is None and self._settings.resolved_quic_host not in ("0.0.0.0", "::"):
            self.address = join_address(self._settings.resolved_quic_host, self.port)
        self._revocations_arrived(self.revocations.refresh_own(), source=None)
        self._tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._dialer.run()),
            asyncio.create_task(self._exchanges()),
        ]
        logger.info("QUIC on %s:%d as %s", self._settings.resolved_quic_host, self.port, self.peer_id[:16])
        return self.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._dialer.stop()
        await self.forwarder.close()
        if self.settler is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settler.drain(), timeout=5.0)
        await self.endpoint.close()
        with contextlib.suppress(OSError):
            self.registry.save()

    # -- authentication -----------------------------------------------------------------------

    def _check_peer(self, certificate: DeviceCertificate) -> None:
        if certificate.peer_id == self.peer_id:
            return  # a node dialing itself: refused after the hello as "self"
        if self.revocations.is_revoked(certificate):
            raise IdentityError(
                f"device {certificate.peer_id[:12]} is revoked by account {certificate.account_id[:12]}"
            )

    def _hello(self, link: PeerLink) -> HelloMessage:
        return make_hello(
            self.identity,
            link.peer_id,
            link.binding,
            node_name=self._settings.node_name,
            address=self.address,
            models=tuple(self._local.models()),
            load=self.load,
        )

    @property
    def load(self) -> int:
        return self._local.load() + self.forwarder.serving

    def _refuse(self, link: PeerLink, stream: FrameStream, error: MycellmError) -> None:
        message = error_message(error)
        logger.warning("refused %s: %s", link.peer_id[:12], message.message)
        with contextlib.suppress(MycellmError):
            stream.send(message, end=True)
        # Let the error frame leave before the connection closes.
        asyncio.get_running_loop().call_later(0.2, link.close, f"refused: {message.message}"[:200])

    async def _on_stream(self, link: PeerLink, stream: FrameStream) -> None:
        session = self._by_link.get(link)
        if session is not None:
            await self.forwarder.serve_stream(session, stream)
            return
        try:
            first = await stream.receive(HELLO_TIMEOUT_S)
            if not isinstance(first, HelloMessage):
                raise ProtocolError("the first message on a link must be a hello", code="unexpected")
            self._hellos.check(first, link.certificate.device_public_key, link.binding)
            stream.send(self._hello(link))
        except MycellmError as error:
            self._refuse(link, stream, error)
            return
        self._open_session(link, first, stream, first.address)

    async def _handshake(self, link: PeerLink, dialed_address: str) -> Session:
        control = link.open_stream()
        control.send(self._hello(link))
        reply = await control.receive(HELLO_TIMEOUT_S)
        if isinstance(reply, ErrorMessage):
            raise PeerError(f"{dialed_address} refused the hello: {reply.message}", code="peer_refused")
        if not isinstance(reply, HelloMessage):
            raise ProtocolError(f"{dialed_address} answered the hello with {reply!r}", code="unexpected")
        try:
            self._hellos.check(reply, link.certificate.device_public_key, link.binding)
        except MycellmError as error:
            self._refuse(link, control, error)
            raise
        return self._open_session(link, reply, control, reply.address or dialed_address)

    def _open_session(
        self, link: PeerLink, hello: HelloMessage, control: FrameStream, address: str | None
    ) -> Session:
        session = Session(link=link, hello=hello, control=control, address=address)
        existing = self.sessions.get(link.peer_id)
        if existing is not None and not existing.link.closed:
            keep, drop = self._pick_link(existing, session)
            if drop is session:
                self._by_link[link] = session  # serve it until it closes, but route over ``keep``
                link.close("duplicate link")
                return keep
            self._drop(existing, "duplicate link")
        self.sessions[link.peer_id] = session
        self._by_link[link] = session
        self.registry.connected(
            link.peer_id,
            account_id=link.certificate.account_id,
            node_name=hello.node_name,
            address=address,
            software_version=hello.software_version,
            models=hello.models,
            load=hello.load,
        )
        session.task = asyncio.create_task(self._control_loop(session))
        if self.settler is not None:
            self.settler.retry_pending(link)  # receipts this peer still owes us
        for message in self._greeting():
            self._send(session, message)
        logger.info(
            "peer %s (%s) connected, %d model(s)", link.peer_id[:12], hello.node_name, len(hello.models)
        )
        self._on_change()
        return session

    def _pick_link(self, first: Session, second: Session) -> tuple[Session, Session]:
        # Both ends must keep the same link of two: the one dialed by the smaller peer id.
        def dialer(session: Session) -> str:
            return self.peer_id if session.link.dialed else session.peer_id

        if dialer(first) == dialer(second):
            return second, first  # a redial after a silent loss: the newer link wins
        return (first, second) if dialer(first) == min(self.peer_id, first.peer_id) else (second, first)

    def _greeting(self) -> list[WireMessage]:
        messages: list[WireMessage] = [PeersRequestMessage()]
        lists = self.revocations.lists()
        if lists:
            messages.append(RevocationsMessage(lists=tuple(item.to_bytes() for item in lists)))
        return messages

    # -- control stream -----------------------------------------------------------------------

    def _send(self, session: Session, message: WireMessage) -> None:
        with contextlib.suppress(MycellmError):
            session.control.send(message)

    async def _control_loop(self, session: Session) -> None:
        while True:
            try:
                message = await session.control.receive()
            except ProtocolError as error:
                if error.recoverable:
                    continue  # answered by the transport; the control stream goes on
                break
            except PeerError:
                break
            if message is None:
                break
            self._on_control(session, message)
        self._drop(session, "control stream ended")

    def _on_control(self, session: Session, message: WireMessage) -> None:
        if isinstance(message, PingMessage):
            self._send(session, PongMessage(seq=message.seq, sent_at=message.sent_at, load=self.load))
        elif isinstance(message, PongMessage):
            sent = session.pings.get(message.seq)
            if sent is not None:
                session.pings = {seq: at for seq, at in session.pings.items() if seq > message.seq}
                self.registry.heard(
                    session.peer_id, rtt_ms=(time.monotonic() - sent) * 1000, load=message.load
                )
                self._on_change()
        elif isinstance(message, PeersRequestMessage):
            self._send(session, PeersMessage(peers=self._shareable_peers(exclude=session.peer_id)))
        elif isinstance(message, PeersMessage):
            for entry in message.peers:
                if entry.peer_id != self.peer_id and entry.peer_id not in self.sessions:
                    with contextlib.suppress(ValueError):
                        split_address(entry.address)
                        self.registry.learn(entry.peer_id, entry.address)
        elif isinstance(message, ReceiptsMessage) and self.settler is not None:
            self.settler.observe(message.receipts, session.peer_id)
        elif isinstance(message, RevocationsMessage):
            accepted = self.revocations.accept(message.lists, source=session.peer_id)
            self._revocations_arrived(accepted, source=session.peer_id)
        elif isinstance(message, ErrorMessage):
            logger.warning("peer %s reported: %s %s", session.peer_id[:12], message.code, message.message)
        else:
            self._send(
                session,
                error_message(ProtocolError(f"{message.kind} is not a control message", code="unexpected")),
            )

    def _shareable_peers(self, exclude: str) -> tuple[PeerAddress, ...]:
        return tuple(
            PeerAddress(peer_id=session.peer_id, address=session.address)
            for session in self.sessions.values()
            if session.address and session.peer_id != exclude
        )[:256]

    # -- liveness -----------------------------------------------------------------------------

    def _drop(self, session: Session, reason: str) -> None:
        if self._by_link.pop(session.link, None) is None:
            return
        if not session.link.closed:
            session.link.close(reason)
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
            self.registry.lost(session.peer_id)
            logger.warning("peer %s lost: %s", session.peer_id[:12], reason)
            self._on_change()

    async def _on_link_closed(self, link: PeerLink) -> None:
        session = self._by_link.get(link)
        if session is not None:
            self._drop(session, link.close_reason or "link closed")

    async def _heartbeats(self) -> None:
        interval, misses = self._settings.heartbeat_interval_s, self._settings.heartbeat_misses
        while True:
            await asyncio.sleep(interval)
            try:
                for session in list(self.sessions.values()):
                    if len(session.pings) >= misses:
                        self._drop(session, f"missed {misses} heartbeats")
                        continue
                    seq = next(self._seq)
                    session.pings[seq] = time.monotonic()
                    self._send(session, PingMessage(seq=seq, sent_at=time.time()))
                self._revocations_arrived(self.revocations.refresh_own(), source=None)
                await self.forwarder.reap(max(30.0, self._settings.stream_idle_timeout_s))
                self.registry.save()
            except Exception:  # supervisor loop: log and go on
                logger.exception("heartbeat round failed")

    async def _exchanges(self) -> None:
        while True:
            await asyncio.sleep(self._settings.peer_exchange_interval_s)
            for session in list(self.sessions.values()):
                self._send(session, PeersRequestMessage())

    # -- dialing ------------------------------------------------------------------------------

    def _wanted(self) -> list[str]:
        linked = {session.address for session in self._by_link.values()} | {
            join_address(*session.link.remote_address)
            for session in self._by_link.values()
            if session.link.dialed
        }
        wanted = [address for address in self._settings.bootstrap_peers if address not in linked]
        room = self._settings.max_peers - len(self.sessions)
        for record in self.registry.records():
            if room <= len(wanted):
                break
            if (
                record.address
                and record.peer_id not in self.sessions
                and record.peer_id != self.peer_id
                and record.address not in linked
                and record.address != self.address
            ):
                wanted.append(record.address)
        return wanted

    async def _dial(self, address: str) -> bool:
        host, port = split_address(address)
        link = await self.endpoint.connect(host, port, DIAL_TIMEOUT_S)
        if link.peer_id == self.peer_id:
            link.close("dialed itself")
            return False
        try:
            await self._handshake(link, address)
        except BaseException:
            link.close("handshake failed")
            raise
        return True

    async def connect(self, address: str) -> Session:
        """Dial ``address`` now and return the session (for tools and tests)."""
        host, port = split_address(address)
        link = await self.endpoint.connect(host, port, DIAL_TIMEOUT_S)
        try:
            return await self._handshake(link, address)
        except BaseException:
            link.close("handshake failed")
            raise

    def _publish_receipt(self, receipt: bytes, source: str | None) -> None:
        message = ReceiptsMessage(receipts=(receipt,))
        for session in list(self.sessions.values()):
            if session.peer_id != source:
                self._send(session, message)

    # -- revocations --------------------------------------------------------------------------

    def _revocations_arrived(self, accepted: list[RevocationList], source: str | None) -> None:
        """Drop links of newly revoked devices and pass the new lists on to the other peers."""
        if not accepted:
            return
        for session in list(self._by_link.values()):
            if self.revocations.is_revoked(session.link.certificate):
                self._drop(session, "device revoked")
        gossip = RevocationsMessage(lists=tuple(item.to_bytes() for item in accepted))
        for session in list(self.sessions.values()):
            if session.peer_id != source:
                self._send(session, gossip)

    # -- views --------------------------------------------------------------------------------

    def peers(self) -> list[PeerRecord]:
        return self.registry.records()

    def session(self, peer_id: str) -> Session:
        session = self.sessions.get(peer_id)
        if session is None or session.link.closed:
            raise PeerError(f"peer {peer_id[:12]} is not connected")
        return session
