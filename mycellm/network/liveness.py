"""Whether a peer's QUIC stack is alive: when it last sent anything on a link (an ACK will do)."""

from __future__ import annotations

import asyncio
import contextlib
import time


class Liveness:
    """The time of the last datagram from a link's peer, and waits for the next one."""

    def __init__(self) -> None:
        self.last_received = time.monotonic()
        self._waiters: list[asyncio.Future[None]] = []

    def saw(self) -> None:
        """A datagram of the peer arrived."""
        self.last_received = time.monotonic()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def received_after(self, moment: float, timeout_s: float) -> bool:
        """Whether the peer sends anything after ``moment`` (monotonic) within ``timeout_s``: alive,
        however busy its application is (its QUIC stack acknowledges what it receives at once)."""
        deadline = time.monotonic() + timeout_s
        while self.last_received <= moment:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)
        return True
