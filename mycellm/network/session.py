"""Sessions: links whose hellos were exchanged and checked, and the table of a node's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mycellm.errors import MycellmError
from mycellm.federation.memberships import MembershipCertificate
from mycellm.network.messages import HelloMessage, PingMessage, WireMessage
from mycellm.network.quic import FrameStream, PeerLink
from mycellm.types import NetworkId, PeerId

logger = logging.getLogger(__name__)


MAX_PROBES = 64


@dataclass
class Session:
    """A link whose hellos have been exchanged and checked, with its control stream."""

    link: PeerLink
    hello: HelloMessage
    control: FrameStream
    address: str | None  # where the peer listens, as it said or as we dialed it
    # The networks this link serves, each with the membership the peer proved it with (see gate).
    networks: dict[NetworkId, MembershipCertificate | None] = field(default_factory=dict)
    _pings: dict[int, float] = field(default_factory=dict, init=False)  # seq -> sent at (monotonic)
    _probes: dict[int, float] = field(default_factory=dict, init=False)  # probe pings: not heartbeats
    last_heard: float = field(default_factory=time.monotonic, init=False)  # any sign of life (monotonic)
    _reader: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def peer_id(self) -> PeerId:
        return self.link.peer_id

    def send(self, message: WireMessage) -> None:
        """Send on the control stream; a link that is going away takes the message with it."""
        with contextlib.suppress(MycellmError):
            self.control.send(message)

    def read_control(self, reader: Callable[[Session], Coroutine[Any, Any, None]]) -> None:
        """Start ``reader`` on this session's control stream (once; ``stop`` cancels it)."""
        assert self._reader is None
        self._reader = asyncio.create_task(reader(self))

    def stop(self) -> None:
        """Cancel the control stream's reader (unless it is the caller)."""
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()

    @property
    def unanswered_pings(self) -> int:
        return len(self._pings)

    def ping(self, seq: int) -> PingMessage:
        """The ping ``seq``, counted as unanswered until its pong comes back."""
        self._pings[seq] = time.monotonic()
        return PingMessage(seq=seq, sent_at=time.time())

    def probe(self, seq: int) -> PingMessage:
        """A ping sent out of turn to see whether the peer is alive; it never counts as a missed
        heartbeat (the heartbeats have their own)."""
        self._probes[seq] = time.monotonic()
        while len(self._probes) > MAX_PROBES:  # unanswered ones of a peer that went away
            self._probes.pop(next(iter(self._probes)))
        return PingMessage(seq=seq, sent_at=time.time())

    def answered(self, seq: int) -> float | None:
        """Round trip of ping ``seq`` in ms (None if it is not ours); it and older pings count as answered."""
        sent = self._pings.get(seq) or self._probes.pop(seq, None)
        if sent is None:
            return None
        self._pings = {other: at for other, at in self._pings.items() if other > seq}
        self.heard()
        return (time.monotonic() - sent) * 1000

    def heard(self) -> None:
        """The peer showed it is alive: a pong, a frame of one of its answers."""
        self.last_heard = time.monotonic()


class SessionTable:
    """Every session still served (one per link), and the one per peer that requests are routed over.

    Two links to one peer can be up for a moment (both dialed at once): both are served until the
    duplicate closes, and requests go over the routed one only.
    """

    def __init__(self) -> None:
        self._routed: dict[PeerId, Session] = {}
        self._served: dict[PeerLink, Session] = {}

    def routed(self, peer_id: PeerId) -> Session | None:
        return self._routed.get(peer_id)

    def of_link(self, link: PeerLink) -> Session | None:
        return self._served.get(link)

    def peer_ids(self) -> list[PeerId]:
        """The peers with a routed session, sorted."""
        return sorted(self._routed)

    def routed_sessions(self) -> list[Session]:
        return list(self._routed.values())

    def served_sessions(self) -> list[Session]:
        return list(self._served.values())

    def __len__(self) -> int:
        return len(self._routed)

    def serve(self, session: Session) -> None:
        self._served[session.link] = session

    def route(self, session: Session) -> None:
        self._served[session.link] = session
        self._routed[session.peer_id] = session

    def remove(self, session: Session) -> tuple[bool, bool]:
        """Forget ``session``: (whether it was served, whether it was the routed one of its peer)."""
        if self._served.pop(session.link, None) is None:
            return False, False
        routed = self._routed.get(session.peer_id) is session
        if routed:
            del self._routed[session.peer_id]
        return True, routed

    def broadcast(
        self, message: WireMessage, skip: PeerId | None = None, network_id: NetworkId | None = None
    ) -> None:
        """Send ``message`` to every routed peer but ``skip`` (the one it came from); with
        ``network_id``, only to the peers of that network."""
        for session in list(self._routed.values()):
            if session.peer_id != skip and (network_id is None or network_id in session.networks):
                session.send(message)


def pick_link(own_peer_id: PeerId, first: Session, second: Session) -> tuple[Session, Session]:
    """Of two links to one peer, (the one to keep, the one to drop): both ends must keep the same one,
    the link dialed by the smaller peer id; a redial after a silent loss (same dialer) keeps the newer."""

    def dialer(session: Session) -> str:
        return own_peer_id if session.link.dialed else session.peer_id

    if dialer(first) == dialer(second):
        return second, first
    return (first, second) if dialer(first) == min(own_peer_id, first.peer_id) else (second, first)
