"""Dialer: keeps dialing the addresses a node wants links to, each with capped exponential backoff.

Addresses learned from peers (hints, never linked yet) are dialed at most so many a minute, so a
node cannot be made to knock on many doors at a relay's word; its bootstrap peers and peers it was
linked to before are dialed without that limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from mycellm.errors import MycellmError

logger = logging.getLogger(__name__)


DIAL_TICK_S = 0.25


FIRST_BACKOFF_S = 0.5


MAX_ATTEMPTS = 1024  # addresses whose attempts are remembered; idle ones no longer wanted go first


@dataclass
class _Attempts:
    """The dial attempts of one address: failures so far, and when the next may start."""

    failures: int = 0
    next_at: float = 0.0
    task: asyncio.Task[None] | None = None
    is_self: bool = False

    def due(self, now: float) -> bool:
        busy = self.task is not None and not self.task.done()
        return not (self.is_self or busy or now < self.next_at)

    def start(self, attempt: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.create_task(attempt)

    def succeeded(self, is_self: bool) -> None:
        self.is_self, self.failures = is_self, 0

    def failed(self, max_backoff_s: float, now: float) -> float:
        """Count a failure; the backoff before the next attempt, in seconds."""
        self.failures += 1
        backoff = min(max_backoff_s, FIRST_BACKOFF_S * 2 ** (self.failures - 1))
        self.next_at = now + backoff * random.uniform(0.8, 1.0)
        return backoff

    @property
    def idle(self) -> bool:
        return self.task is None or self.task.done()


class DialBudget:
    """At most ``per_minute`` dials in any minute (a sliding window over the clock given)."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._starts: deque[float] = deque()

    def take(self, now: float) -> bool:
        while self._starts and now - self._starts[0] >= self.WINDOW_S:
            self._starts.popleft()
        if len(self._starts) >= self._per_minute:
            return False
        self._starts.append(now)
        return True


class Dialer:
    """``wanted()`` names the addresses to dial now; ``dial(address)`` links to one.

    ``hinted()`` names learned addresses, in the order to try them: of those, at most
    ``max_hint_dials_per_minute`` are dialed a minute (each attempt counts). ``dial`` returns False
    when the address turns out to be this node (it is never dialed again) and raises MycellmError,
    ValueError or OSError when it fails (the next try backs off).
    """

    def __init__(
        self,
        wanted: Callable[[], list[str]],
        dial: Callable[[str], Awaitable[bool]],
        max_backoff_s: float,
        *,
        hinted: Callable[[], list[str]] = list,
        max_hint_dials_per_minute: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wanted = wanted
        self._hinted = hinted
        self._dial = dial
        self._max_backoff_s = max_backoff_s
        self._hint_budget = DialBudget(max_hint_dials_per_minute)
        self._clock = clock
        self._attempts: dict[str, _Attempts] = {}

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(DIAL_TICK_S)

    def tick(self) -> list[asyncio.Task[None]]:
        """One round: start every attempt that is due (hints within their budget); the tasks started."""
        now = self._clock()
        started: list[asyncio.Task[None]] = []
        wanted = self._wanted()
        for address in wanted:
            started += self._start(address, now, budget=None)
        for address in self._hinted():
            if address not in wanted:
                started += self._start(address, now, budget=self._hint_budget)
        if len(self._attempts) > MAX_ATTEMPTS:
            self._attempts = {
                address: attempts
                for address, attempts in self._attempts.items()
                if not attempts.idle or address in wanted
            }
        return started

    def _start(self, address: str, now: float, budget: DialBudget | None) -> list[asyncio.Task[None]]:
        attempts = self._attempts.setdefault(address, _Attempts())
        if not attempts.due(now) or (budget is not None and not budget.take(now)):
            return []
        attempts.start(self._try(address, attempts))
        assert attempts.task is not None
        return [attempts.task]

    async def _try(self, address: str, attempts: _Attempts) -> None:
        try:
            attempts.succeeded(is_self=not await self._dial(address))
        except (MycellmError, ValueError, OSError) as error:
            backoff = attempts.failed(self._max_backoff_s, self._clock())
            logger.info("dial %s failed (%s); next try in %.1f s", address, error, backoff)

    def stop(self) -> None:
        for attempts in self._attempts.values():
            if attempts.task is not None:
                attempts.task.cancel()
