"""PeerService: the links of a node to its peers (hellos, sessions, dialing) and the requests over them.

Ray-free: the PeerManager actor wraps one PeerService; tests and benchmarks drive it directly.
Each session's control stream is ``control``'s; requests over the links are ``forwarding``'s (ours,
sent to a peer) and ``serving``'s (a peer's, served here); payments are ``settlement``'s; which
networks each link serves is ``network_links``'s; joins are ``joining``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from mycellm.config import NodeSettings, join_address, split_address
from mycellm.errors import IdentityError, MycellmError, PeerError
from mycellm.federation.held import HeldNetwork, create_default_network
from mycellm.federation.invites import InviteToken
from mycellm.federation.memberships import MembershipCertificate
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.identity.revocation_keeper import RevocationKeeper
from mycellm.network.control import ControlChannel
from mycellm.network.dial_targets import DialTargets
from mycellm.network.forwarding import Forwarder
from mycellm.network.hello import HELLO_TIMEOUT_S, HelloChecker, accept_hello, make_hello, offer_hello, refuse
from mycellm.network.hello import close_if_silent as _close_if_silent
from mycellm.network.joining import Joins
from mycellm.network.link_views import LinkedPeer, describe_links, linked_peers
from mycellm.network.messages import HelloMessage, JoinRequestMessage, PeersRequestMessage
from mycellm.network.network_links import KeeperFactory, NetworkLinks
from mycellm.network.peer_addresses import OwnAddress
from mycellm.network.peer_hints import PeerHints
from mycellm.network.quic import FrameStream, LinkLimits, PeerLink, QuicEndpoint
from mycellm.network.registry import PeerRegistry
from mycellm.network.serving import LocalServer, RequestServer
from mycellm.network.session import Session, SessionTable, pick_link
from mycellm.network.settlement import Settler
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    NetworkId,
    PeerId,
    RequestId,
    Usage,
)

logger = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 5.0
REGISTRY_FILE = "peers.json"


class PeerService:
    """A node's QUIC endpoint, its sessions with peers, and the requests that go over them.

    ``local`` serves the peers' requests; ``on_change`` hears of every change to the peers or to
    what is known of them; ``keepers`` opens the books of each network (without it links carry no
    payments: tools, transport tests). A link serves the networks its peer proved (``network_links``).
    """

    def __init__(
        self,
        settings: NodeSettings,
        identity: NodeIdentity,
        local: LocalServer,
        *,
        on_change: Callable[[], None] | None = None,
        keepers: KeeperFactory | None = None,
    ) -> None:
        self._settings = settings
        self.identity = identity
        self.peer_id = PeerId(identity.peer_id)
        self._local = local
        self._on_change = on_change or (lambda: None)
        data_dir = settings.resolved_data_dir
        self.registry = PeerRegistry(data_dir / REGISTRY_FILE, settings.credits.reputation_half_life_s)
        self.revocations = RevocationKeeper(data_dir)
        self._hellos = HelloChecker(self.peer_id)
        self._sessions = SessionTable()
        self.endpoint = QuicEndpoint(
            identity,
            on_stream=self._on_stream,
            check_peer=self._check_peer,
            on_link=lambda link: _close_if_silent(link, self._sessions.of_link),
            on_link_closed=self._on_link_closed,
            limits=LinkLimits.of(settings),
            idle_timeout_s=max(30.0, settings.heartbeat_interval_s * (settings.heartbeat_misses + 2)),
        )
        self.networks = NetworkLinks(
            settings,
            identity,
            self._sessions,
            self.registry,
            keepers,
            drop=self._drop,
            on_change=self._on_change,
        )
        self._joins = Joins(settings, identity, self.endpoint, self.networks)
        counter = local.count_tokens
        self._forwarder = Forwarder(self.session, self.registry, settings, self.networks.terms, counter)
        self._requests = RequestServer(local, self.networks.link_terms)
        own = OwnAddress(identity, lambda: self.address)
        self.hints = PeerHints.of(settings, self.revocations.is_revoked)
        self._control = ControlChannel(
            self.peer_id,
            self._sessions,
            self.registry,
            self.revocations,
            self.networks,
            load=lambda: self.load,
            on_change=self._on_change,
            drop=self._drop,
            hints=self.hints,
            own_entry=own.entry,
        )
        self._targets = DialTargets(settings, own, self._sessions, self.registry, self.networks, self.hints)
        self._dialer = self._targets.dialer(self._dial)
        self._tasks: list[asyncio.Task[None]] = []
        self.address: str | None = settings.resolved_advertise_address
        self.port = 0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        create_default_network(self._settings, self.identity)
        await self.networks.load()
        await self._joins.join_configured()
        self.port = await self.endpoint.listen(self._settings.resolved_quic_host, self._settings.quic_port)
        if self.address is None and self._settings.resolved_quic_host not in ("0.0.0.0", "::"):
            self.address = join_address(self._settings.resolved_quic_host, self.port)
        self._control.revocations_arrived(self.revocations.refresh_own(), source=None)
        self._tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self.networks.watch()),
            asyncio.create_task(self._dialer.run()),
            asyncio.create_task(self._exchanges()),
        ]
        logger.info("QUIC on %s:%d as %s", self._settings.resolved_quic_host, self.port, self.peer_id[:16])
        return self.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._dialer.stop()
        await self._forwarder.close()
        self._requests.close()
        settlers = self.networks.settlers()
        if settlers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(item.drain() for item in settlers)), timeout=5.0)
        await self.endpoint.close()
        await self._joins.close()
        with contextlib.suppress(OSError):
            self.registry.save()

    # -- requests to peers (the PeerManager's, on behalf of the ingress) -----------------------

    async def open(self, peer_id: PeerId, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        """Send ``request`` to ``peer_id``; its first chunk (errors before any output raise)."""
        return await self._forwarder.open(peer_id, request, wait_s)

    async def pull(self, request_id: RequestId, wait_s: float) -> GenerationChunk | None:
        return await self._forwarder.pull(request_id, wait_s)

    def follow(self, request_id: RequestId) -> AsyncIterator[GenerationChunk]:
        """The rest of an opened stream to a peer, each delivery as it is ready."""
        return self._forwarder.follow(request_id)

    async def cancel(self, request_id: RequestId) -> bool:
        return await self._forwarder.cancel(request_id)

    def settle_broken(self, request_id: RequestId, usage: Usage) -> None:
        self._forwarder.settle_broken(request_id, usage)

    async def complete(self, peer_id: PeerId, request: GenerationRequest) -> CompletionResult:
        return await self._forwarder.complete(peer_id, request)

    async def embed(self, peer_id: PeerId, request: EmbeddingRequest, timeout_s: float) -> EmbeddingResult:
        return await self._forwarder.embed(peer_id, request, timeout_s)

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
            memberships=self.networks.memberships(),
        )

    async def _on_stream(self, link: PeerLink, stream: FrameStream) -> None:
        if self._sessions.of_link(link) is not None:
            await self._requests.serve(link, stream)
            return
        try:
            first = await stream.receive(HELLO_TIMEOUT_S)
        except MycellmError as error:
            refuse(link, stream, error)
            return
        if isinstance(first, JoinRequestMessage):
            await self._joins.answer(link, stream, first)
            return
        admitted = await accept_hello(
            link, stream, first, self._hellos, self._hello, lambda hello: self.networks.admit(link, hello)
        )
        if admitted is not None:
            hello, networks = admitted
            self._open_session(link, hello, stream, hello.address, networks)

    async def _handshake(self, link: PeerLink, dialed_address: str) -> Session:
        hello, networks, control = await offer_hello(
            link,
            self._hellos,
            self._hello(link),
            dialed_address,
            lambda hello: self.networks.admit(link, hello),
        )
        return self._open_session(link, hello, control, hello.address or dialed_address, networks)

    # -- sessions -----------------------------------------------------------------------------

    def _open_session(
        self,
        link: PeerLink,
        hello: HelloMessage,
        control: FrameStream,
        address: str | None,
        networks: dict[NetworkId, MembershipCertificate | None],
    ) -> Session:
        session = Session(link=link, hello=hello, control=control, address=address, networks=networks)
        existing = self._sessions.routed(link.peer_id)
        if existing is not None and not existing.link.closed:
            keep, drop = pick_link(self.peer_id, existing, session)
            if drop is session:
                self._sessions.serve(session)  # serve it until it closes, but route over ``keep``
                link.close("duplicate link")
                return keep
            self._drop(existing, "duplicate link")
        self._sessions.route(session)
        self.hints.forget(link.peer_id)
        self.registry.connected(
            link.peer_id,
            account_id=link.certificate.account_id,
            node_name=hello.node_name,
            address=address,
            software_version=hello.software_version,
            models=hello.models,
            load=hello.load,
        )
        session.read_control(self._control.run)
        for network_id in networks:
            settler = self.networks.terms(network_id).settler
            if settler is not None:
                settler.retry_pending(link)  # receipts this peer still owes us
        for message in self._control.greeting(session):
            session.send(message)
        logger.info(
            "peer %s (%s) connected, %d model(s)", link.peer_id[:12], hello.node_name, len(hello.models)
        )
        self._on_change()
        return session

    def _drop(self, session: Session, reason: str) -> None:
        served, routed = self._sessions.remove(session)
        if not served:
            return
        if not session.link.closed:
            session.link.close(reason)
        session.stop()
        if routed:
            self.registry.lost(session.peer_id)
            logger.warning("peer %s lost: %s", session.peer_id[:12], reason)
            self._on_change()

    async def _on_link_closed(self, link: PeerLink) -> None:
        session = self._sessions.of_link(link)
        if session is not None:
            self._drop(session, link.close_reason or "link closed")

    # -- rounds -------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_interval_s)
            try:
                self._control.ping_all(self._settings.heartbeat_misses)
                self._control.revocations_arrived(self.revocations.refresh_own(), source=None)
                await self.networks.spread(await self.networks.load())
                self._joins.renewals.start_due()
                self.networks.recheck()
                await self._forwarder.reap(max(30.0, self._settings.stream_idle_timeout_s))
                self.registry.save()
            except Exception:  # supervisor loop: log and go on
                logger.exception("heartbeat round failed")

    async def _exchanges(self) -> None:
        while True:
            await asyncio.sleep(self._settings.peer_exchange_interval_s)
            self._sessions.broadcast(PeersRequestMessage())

    # -- dialing ------------------------------------------------------------------------------

    async def _dial(self, address: str, join: bool = True) -> bool:
        self.hints.dialed(address)  # a learned address is tried a few times at most
        host, port = split_address(address)
        link = await self.endpoint.connect(host, port, DIAL_TIMEOUT_S)
        if link.peer_id == self.peer_id:
            link.close("dialed itself")
            return False
        try:
            await self._handshake(link, address)
        except PeerError as error:
            link.close("handshake failed")
            if not join or error.code != "peer_not_a_member" or address not in self._settings.bootstrap_peers:
                raise
            await self.join(address)  # a configured bootstrap of a network this node is not in yet
            return await self._dial(address, join=False)
        except BaseException:
            link.close("handshake failed")
            raise
        return True

    async def join(
        self, address: str, invite: InviteToken | None = None, network_id: str | None = None
    ) -> HeldNetwork:
        """Join a network at its bootstrap ``address`` (with an invite, or a public one) and keep it."""
        network = await self._joins.join(address, invite, network_id)
        self._on_change()
        return network

    async def connect(self, address: str) -> Session:
        """Dial ``address`` now and return the session (for tools and tests)."""
        host, port = split_address(address)
        link = await self.endpoint.connect(host, port, DIAL_TIMEOUT_S)
        try:
            return await self._handshake(link, address)
        except BaseException:
            link.close("handshake failed")
            raise

    # -- views --------------------------------------------------------------------------------

    @property
    def load(self) -> int:
        """Requests this node is working on: its own engines' and the peers' it serves."""
        return self._local.load() + self._requests.serving

    @property
    def serving(self) -> int:
        """Peers' requests being served here now."""
        return self._requests.serving

    def connected(self) -> list[PeerId]:
        """The peers with a session now, sorted."""
        return self._sessions.peer_ids()

    @property
    def settler(self) -> Settler | None:
        """The settler of the default network (None without books)."""
        return self.networks.terms(None).settler

    def session(self, peer_id: PeerId, network_id: NetworkId | None = None) -> Session:
        """The session requests to ``peer_id`` in ``network_id`` (None: the default network) go over;
        PeerError if it is not connected, NotAMemberError if the link does not serve that network."""
        session = self._sessions.routed(peer_id)
        if session is None or session.link.closed:
            raise PeerError(f"peer {peer_id[:12]} is not connected")
        return self.networks.session_in(session, network_id)

    def linked_peers(self) -> list[LinkedPeer]:
        """Every connected peer with what it serves and its standing (the makings of its routes)."""
        return linked_peers(self._sessions, self.registry)

    def describe(self) -> dict[str, Any]:
        """This node's links, its networks and what it knows of every peer, as JSON values."""
        return describe_links(self, self._sessions, self.registry, self.revocations, self.networks.held)
