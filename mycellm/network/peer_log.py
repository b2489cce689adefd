"""Warnings about what a peer sent, at most a few a minute per peer: refused gossip cannot flood the log.

A flood of forged receipts, records or revocation lists within the gossip budget would otherwise
write one warning each (tens of thousands of lines a minute from one peer). Each peer gets
``PEER_LOG_LINES`` warnings a window; the rest are counted and reported in one line when the next
window opens.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

PEER_LOG_LINES = 5
PEER_LOG_WINDOW_S = 60.0
PEER_LOG_PEERS = 4096  # peers whose windows are kept (the oldest is forgotten first)


class PeerLog:
    """Rate-limited warnings keyed by the peer they are about."""

    def __init__(self, lines: int = PEER_LOG_LINES, window_s: float = PEER_LOG_WINDOW_S) -> None:
        self._lines, self._window_s = lines, window_s
        self._windows: OrderedDict[str, list[float]] = OrderedDict()  # peer: [start, used, dropped]

    def warning(self, logger: logging.Logger, peer_id: str, message: str, *args: object) -> None:
        now = time.monotonic()
        window = self._windows.pop(peer_id, None) or [now, 0.0, 0.0]
        if now - window[0] > self._window_s:
            if window[2]:
                logger.warning("%d more warnings about peer %s were not logged", int(window[2]), peer_id[:12])
            window = [now, 0.0, 0.0]
        if window[1] < self._lines:
            logger.warning(message, *args)
            window[1] += 1
        else:
            window[2] += 1
        self._windows[peer_id] = window
        while len(self._windows) > PEER_LOG_PEERS:
            self._windows.popitem(last=False)


PEER_LOG = PeerLog()
