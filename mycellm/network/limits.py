"""Bounds on what a peer can make a node hold: links, streams, queued frames, requests, gossip."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from mycellm.config import NodeSettings
from mycellm.network.codec import DEFAULT_MAX_FRAME_BYTES, HEADER


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """The caps of one node's links, read once from its settings (the defaults are the settings')."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_inbound_links: int = 64  # links peers dialed to this node, hello or not
    max_handshaking: int = 64  # connections whose TLS handshake is not done yet
    max_streams_per_link: int = 64  # streams a peer has open to this node at once, per link
    max_queued_frames_per_stream: int = 4096  # frames received but not read yet, per stream
    max_buffered_bytes_per_stream: int = 4 << 20  # their bytes, with a partial frame's
    max_requests_per_peer: int = 64  # generations and embeddings served to one peer at once
    max_gossip_per_minute: int = 1200  # receipts, revocations, peer lists, news from one peer

    @classmethod
    def of(cls, settings: NodeSettings) -> LinkLimits:
        return cls(
            max_frame_bytes=settings.max_frame_bytes,
            max_inbound_links=settings.max_inbound_links,
            max_handshaking=settings.max_handshaking,
            max_streams_per_link=settings.max_streams_per_link,
            max_queued_frames_per_stream=settings.max_queued_frames_per_stream,
            # A stream must be able to hold one whole frame of the largest size.
            max_buffered_bytes_per_stream=max(
                settings.max_buffered_bytes_per_stream, settings.max_frame_bytes + HEADER.size
            ),
            max_requests_per_peer=settings.max_requests_per_peer,
            max_gossip_per_minute=settings.max_gossip_per_minute,
        )


class GossipBudget:
    """Per peer, how many gossip messages it may still send this minute (a fixed one-minute window).

    Windows outlive sessions (a peer does not get a fresh budget by linking again); expired ones are
    dropped once more than ``MAX_PEERS`` are kept.
    """

    WINDOW_S = 60.0

    MAX_PEERS = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # peer id -> (window start, messages in it)

    def take(self, peer_id: str, per_minute: int) -> Literal["ok", "dropped", "flooded"]:
        """Count one message of ``peer_id``: "ok" within its budget; over it "flooded" for the first
        message of this window, "dropped" for the later ones (neither is to be processed)."""
        now = self._clock()
        start, count = self._windows.get(peer_id, (now, 0))
        if now - start >= self.WINDOW_S:
            start, count = now, 0
        self._windows[peer_id] = (start, count + 1)
        if len(self._windows) > self.MAX_PEERS:
            self._windows = {
                peer: window for peer, window in self._windows.items() if now - window[0] < self.WINDOW_S
            }
        if count < per_minute:
            return "ok"
        return "flooded" if count == per_minute else "dropped"


class BoundedServer(QuicServer):
    """aioquic's server, but a new connection over the cap of handshakes is dropped before any state.

    ``room`` says whether another handshake may start; a client whose Initial is dropped retries it
    (QUIC retransmits), so a burst only delays newcomers.
    """

    def __init__(self, room: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._room = room

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return
        new = header.destination_cid not in self._protocols and header.packet_type == QuicPacketType.INITIAL
        if new and not self._room():
            return
        super().datagram_received(data, addr)
