"""The control stream of each session: heartbeats, peer exchange, and the receipts and revocations peers pass on."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from mycellm.errors import IdentityError, PeerError, ProtocolError
from mycellm.identity.revocation_keeper import RevocationKeeper
from mycellm.identity.revocations import RevocationList
from mycellm.network.limits import GossipBudget
from mycellm.network.messages import (
    CONTROL_KINDS,
    MAX_PEERS_PER_MESSAGE,
    ErrorMessage,
    FraudProofMessage,
    NetworkNewsMessage,
    PeerAddress,
    PeersMessage,
    PeersRequestMessage,
    PingMessage,
    PongMessage,
    ReceiptsMessage,
    RevocationsMessage,
    WireMessage,
    error_message,
)
from mycellm.network.network_links import NetworkLinks
from mycellm.network.peer_addresses import HeardAddress, Verdict, read_address
from mycellm.network.peer_hints import PeerHints, verified
from mycellm.network.peer_log import PEER_LOG
from mycellm.network.registry import PeerRegistry
from mycellm.network.session import Session, SessionTable
from mycellm.types import PeerId

logger = logging.getLogger(__name__)


# Control messages a peer sends on its own, each counted against its gossip budget per minute.
GOSSIP_KINDS: frozenset[str] = frozenset(
    message.kind
    for message in (
        PeersRequestMessage,
        PeersMessage,
        ReceiptsMessage,
        FraudProofMessage,
        RevocationsMessage,
        NetworkNewsMessage,
    )
)


class ControlChannel:
    """Reads and answers the control stream of every session, and sends what a node tells all its peers.

    ``load`` is this node's load as a pong reports it; ``on_change`` hears of every change to what
    the registry knows of a peer; ``drop`` ends a session (a peer that missed its heartbeats, a
    revoked device, a control stream that ended).

    Peer exchange: a peer list starts with the sender's own signed address record (``own_entry``),
    kept here as what that peer says of itself and relayed verbatim to the other peers of its
    networks; the other entries are other peers' records, which go to ``hints``. A list with a
    forged entry counts once against its sender and the rest of it is not read: an honest relay
    only passes on records it checked.
    """

    def __init__(
        self,
        own_peer_id: PeerId,
        sessions: SessionTable,
        registry: PeerRegistry,
        revocations: RevocationKeeper,
        networks: NetworkLinks,
        *,
        load: Callable[[], int],
        on_change: Callable[[], None],
        drop: Callable[[Session, str], None],
        hints: PeerHints,
        own_entry: Callable[[], PeerAddress | None],
    ) -> None:
        self._own_peer_id = own_peer_id
        self.hints = hints
        self._own_entry = own_entry
        self._direct: dict[PeerId, HeardAddress] = {}  # each linked peer's newest record of itself
        self._sessions = sessions
        self._registry = registry
        self._revocations = revocations
        self._networks = networks
        self._news: set[asyncio.Task[None]] = set()
        self._load = load
        self._on_change = on_change
        self._drop = drop
        self._seq = itertools.count()
        self.gossip = GossipBudget()

    async def run(self, session: Session) -> None:
        """Handle ``session``'s control messages until its control stream ends, then drop it."""
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
            self.handle(session, message)
        self._drop(session, "control stream ended")

    def handle(self, session: Session, message: WireMessage) -> None:
        if message.kind not in CONTROL_KINDS:
            self._unexpected(session, message)
            return
        if message.kind in GOSSIP_KINDS and not self._within_budget(session):
            return
        match message:
            case PingMessage():
                session.send(PongMessage(seq=message.seq, sent_at=message.sent_at, load=self._load()))
            case PongMessage():
                self._on_pong(session, message)
            case PeersRequestMessage():
                session.send(PeersMessage(peers=self._shareable_peers(session)))
            case PeersMessage():
                self._on_peers(session, message)
            case ReceiptsMessage():
                self._on_receipts(session, message)
            case FraudProofMessage():
                if self._networks.settlers():  # a node that keeps no credits has no use for them
                    self._networks.observe_fraud(session, message)
            case RevocationsMessage():
                accepted = self._revocations.accept(message.lists, source=session.peer_id)
                self.revocations_arrived(accepted, source=session.peer_id)
            case NetworkNewsMessage():
                task = asyncio.get_running_loop().create_task(self._networks.heard(session, message))
                self._news.add(task)
                task.add_done_callback(self._news.discard)
            case ErrorMessage():
                PEER_LOG.warning(
                    logger,
                    session.peer_id,
                    "peer %s reported: %s %s",
                    session.peer_id[:12],
                    message.code,
                    message.message,
                )
            case _:  # declared in CONTROL_KINDS but not handled here: still answered
                self._unexpected(session, message)

    def _within_budget(self, session: Session) -> bool:
        """Whether the peer is within its gossip budget; over it, the message is dropped unread."""
        per_minute = session.link.limits.max_gossip_per_minute
        verdict = self.gossip.take(session.peer_id, per_minute)
        if verdict == "flooded":  # once a window: logged and counted against its reputation
            logger.warning("peer %s is over %d gossip messages a minute", session.peer_id[:12], per_minute)
            self._registry.outcome(session.peer_id, ok=False)
        return verdict == "ok"

    def _unexpected(self, session: Session, message: WireMessage) -> None:
        session.send(
            error_message(ProtocolError(f"{message.kind} is not a control message", code="unexpected"))
        )

    def _on_pong(self, session: Session, pong: PongMessage) -> None:
        rtt_ms = session.answered(pong.seq)
        if rtt_ms is None:
            return  # not a ping of ours, or one already answered
        self._registry.heard(session.peer_id, rtt_ms=rtt_ms, load=pong.load)
        self._on_change()

    def _on_peers(self, session: Session, message: PeersMessage) -> None:
        for entry in message.peers:
            if entry.peer_id == session.peer_id:
                verdict = self._on_own_record(session, entry)
            elif entry.peer_id == self._own_peer_id or self._sessions.routed(entry.peer_id) is not None:
                continue  # what a linked peer says of itself counts, not what others relay of it
            else:
                verdict = self.hints.hear(entry, source=session.peer_id)
            if verdict == "forged":
                PEER_LOG.warning(
                    logger, session.peer_id, "peer %s relayed a forged address record", session.peer_id[:12]
                )
                self._registry.outcome(session.peer_id, ok=False)
                return

    def record_of(self, peer_id: PeerId) -> HeardAddress | None:
        """The newest record a linked peer sent of itself (what this node relays of it)."""
        return self._direct.get(peer_id)

    def _on_own_record(self, session: Session, entry: PeerAddress) -> Verdict:
        """The sender's record of itself: kept (for relaying) if it verifies and is newer."""
        now = time.time()
        try:
            heard = read_address(entry)
        except IdentityError:
            return "forged"
        held = self._direct.get(session.peer_id)
        if not heard.fresh(now):
            return "stale"
        if held is not None and held.signed_at >= heard.signed_at:
            return "known"
        verdict = verified(heard, self._revocations.is_revoked, now)
        if verdict == "kept":
            self._direct[session.peer_id] = heard
            if len(self._direct) > 2 * len(self._sessions) + 16:  # records of peers gone
                routed = set(self._sessions.peer_ids())
                self._direct = {peer: item for peer, item in self._direct.items() if peer in routed}
        return verdict

    def _on_receipts(self, session: Session, message: ReceiptsMessage) -> None:
        if not self._networks.settlers():  # a node that keeps no credits has no use for receipts
            self._unexpected(session, message)
            return
        self._networks.observe(session, message.receipts)

    def _shareable_peers(self, asker: Session) -> tuple[PeerAddress, ...]:
        """This node's own record, then the records of the peers the asker may learn of: linked peers
        in a network it shares with this node, each record as that peer signed it (and still fresh)."""
        now = time.time()
        own = self._own_entry()
        relayed = [
            PeerAddress(peer_id=session.peer_id, record=heard.raw)
            for session in self._sessions.routed_sessions()
            if (heard := self._direct.get(session.peer_id)) is not None
            and heard.fresh(now)
            and session.peer_id != asker.peer_id
            and set(asker.networks) & set(session.networks)
        ]
        return (*([own] if own is not None else []), *relayed)[:MAX_PEERS_PER_MESSAGE]

    # -- what a node sends on its own ------------------------------------------------------------

    def greeting(self, session: Session) -> list[WireMessage]:
        """What a node sends a peer as soon as the session is open."""
        messages: list[WireMessage] = [PeersRequestMessage()]
        news = self._networks.greeting(session)
        if news is not None:
            messages.append(news)
        messages.extend(RevocationsMessage.batches([item.to_bytes() for item in self._revocations.lists()]))
        return messages

    def ping_all(self, misses: int) -> None:
        """One heartbeat round: drop each peer that left ``misses`` pings unanswered, ping the rest."""
        for session in self._sessions.routed_sessions():
            if session.unanswered_pings >= misses:
                self._drop(session, f"missed {misses} heartbeats")
                continue
            session.send(session.ping(next(self._seq)))

    def revocations_arrived(self, accepted: list[RevocationList], source: PeerId | None) -> None:
        """Drop links of newly revoked devices and pass the new lists on to the other peers."""
        if not accepted:
            return
        for session in self._sessions.served_sessions():
            if self._revocations.is_revoked(session.link.certificate):
                self._drop(session, "device revoked")
        for gossip in RevocationsMessage.batches([item.to_bytes() for item in accepted]):
            self._sessions.broadcast(gossip, skip=source)
