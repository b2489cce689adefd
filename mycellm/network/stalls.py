"""Noticing a peer that stopped answering mid-request, without waiting for heartbeats.

A forwarded request reads its answer with a ``StallClock``: silence longer than several times the
stream's own pace between frames (at least ``floor_s``) makes the caller look for a sign of life
from the peer: a frame of another of its answers since the silence began, else anything at all
from it after a probe ping sent on the link's control stream at once (its QUIC stack acknowledges
the ping within a round trip, even while the node reads a long prompt or its control stream is
busy with gossip). A live peer is waited for again; one that shows none is taken for dead for
this request: the caller fails it with PeerError, which the router treats like any dead route
(the next route resumes the answer) and the registry counts against the peer, so its routes rank
below the others at once. The link itself is left to the heartbeats: a probe never counts as a
missed heartbeat, and one slow moment must not take every other answer on that link with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Any

from mycellm.errors import MycellmError, PeerError
from mycellm.network.session import Session

if TYPE_CHECKING:
    from mycellm.network.frame_stream import FrameStream
    from mycellm.network.messages import WireMessage

STALL_FLOOR_S = 1.0  # the least silence that probes a peer
STALL_PACE_FACTOR = 6.0  # silence of this many times the stream's usual gap probes it too
PACE_SMOOTHING = 0.2  # weight of the newest gap in the stream's pace
PROBE_FLOOR_S = 0.5  # the least time a probe waits for its pong
PROBE_RTT_FACTOR = 4.0  # and at least this many of the peer's round trips
LATE_FACTOR = 2.0  # and at least this many times the lateness of this node's own loop
GRACE_TURNS = 3  # turns of this node's event loop a failed probe waits before it counts
EARLY_PROBE_FRACTION = 0.5  # this far into the allowed silence a probe goes out early

# Probes count from far above the heartbeat's ping numbers: a pong to a probe answers older pings.
_PROBE_SEQ = itertools.count(1 << 48)


class StallClock:
    """The pace of one stream's frames, and how long a silence may last before a probe."""

    def __init__(self, floor_s: float = STALL_FLOOR_S) -> None:
        self.floor_s = floor_s
        self._gap_s: float | None = None
        self._frames = 0
        self._last = time.monotonic()

    def heard(self, now: float | None = None) -> None:
        """A frame came; the wait for the first one (the prompt being read) is not the pace."""
        now = time.monotonic() if now is None else now
        if self._frames:
            gap = now - self._last
            self._gap_s = gap if self._gap_s is None else self._gap_s + PACE_SMOOTHING * (gap - self._gap_s)
        self._frames += 1
        self._last = now

    def timeout_s(self) -> float:
        """How long to wait for the next frame before probing the peer."""
        if self._gap_s is None:
            return self.floor_s
        return max(self.floor_s, STALL_PACE_FACTOR * self._gap_s)

    @property
    def last(self) -> float:
        """When the stream last heard a frame (monotonic)."""
        return self._last

    def silent_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self._last


async def probe(session: Session, since: float, rtt_ms: float | None = None, late_s: float = 0.0) -> bool:
    """Whether the peer of ``session`` is alive: heard from after ``since`` (monotonic), or answering
    a ping within a few of its round trips (at least PROBE_FLOOR_S). ``late_s``: how late this
    node's own loop noticed the silence; a busy loop reads pongs late, so it waits longer."""
    if session.last_heard > since:
        return True
    wait_s = max(PROBE_FLOOR_S, PROBE_RTT_FACTOR * (rtt_ms or 0.0) / 1000.0, LATE_FACTOR * late_s)
    sent = time.monotonic()
    try:
        session.control.send(session.probe(next(_PROBE_SEQ)))
    except MycellmError:
        return False  # the link is gone already
    # The ping is acknowledged by the peer's QUIC stack at once, even when its control stream is
    # busy (a pong waits behind the gossip before it), so any datagram after it is a sign of life.
    if await session.link.liveness.received_after(sent, wait_s):
        return True
    for _ in range(GRACE_TURNS):  # a datagram this node's own busy loop has not read yet
        await asyncio.sleep(0)
    return session.link.liveness.last_received > sent or session.last_heard > since


async def receive_watching(session: Session, stream: FrameStream, timeout_s: float) -> WireMessage | None:
    """The stream's next frame within ``timeout_s`` (TimeoutError if none comes).

    Part way through a silence a probe goes out early: the host of a peer whose process is gone
    answers it with ICMP port unreachable (heard on the connected socket of a link this node
    dialed), and the answer fails at once with PeerError instead of waiting out the silence."""
    receiving: asyncio.Future[WireMessage | None] = asyncio.ensure_future(stream.receive())
    try:
        done, _ = await asyncio.wait({receiving}, timeout=timeout_s * EARLY_PROBE_FRACTION)
        if receiving in done:
            return receiving.result()
        sent = time.monotonic()
        with contextlib.suppress(MycellmError):  # the link is gone: the stream fails on its own
            session.control.send(session.probe(next(_PROBE_SEQ)))
        rest = timeout_s * (1 - EARLY_PROBE_FRACTION)
        refused = asyncio.ensure_future(session.link.liveness.refused_after(sent, rest))
        either: list[asyncio.Future[Any]] = [receiving, refused]
        try:
            done, _ = await asyncio.wait(either, timeout=rest, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if receiving in done:
            return receiving.result()
        if refused in done and not refused.cancelled() and refused.result():
            raise PeerError(
                f"peer {session.peer_id[:12]} is gone: its host refused a probe (no process listens)"
            )
        raise TimeoutError
    finally:
        if not receiving.done():
            receiving.cancel()
