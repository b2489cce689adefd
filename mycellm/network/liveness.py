"""Whether a peer's QUIC stack is alive: when it last sent anything on a link (an ACK will do), and
whether its host said that nothing listens on its port any more (ICMP, on a dialed link)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any


class Liveness:
    """The time of the last datagram from a link's peer, and waits for the next one."""

    def __init__(self) -> None:
        self.last_received = time.monotonic()
        self.refused_at = 0.0  # when the peer's host last said nothing listens on its port
        self._waiters: list[asyncio.Future[None]] = []

    def saw(self) -> None:
        """A datagram of the peer arrived."""
        self.last_received = time.monotonic()
        self._wake()

    def refused(self) -> None:
        """The peer's host answered with ICMP port unreachable: no process listens there any more."""
        self.refused_at = time.monotonic()
        self._wake()

    async def refused_after(self, moment: float, timeout_s: float) -> bool:
        """Whether the peer's port is refused after ``moment`` (monotonic), within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.refused_at <= moment:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._wait(left)
        return True

    async def _wait(self, timeout_s: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout_s)

    def _wake(self) -> None:
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
            if left <= 0 or self.refused_at > moment:
                return False
            await self._wait(left)
        return True


class ConnectedSend:
    """A dialed link's transport: its socket is connected (so it hears ICMP port unreachable), and
    an event loop may refuse a send that names the address again (uvloop does)."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._transport.sendto(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
