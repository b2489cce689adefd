"""Dialer: keeps dialing the addresses a node wants links to, each with capped exponential backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from mycellm.errors import MycellmError

logger = logging.getLogger(__name__)


DIAL_TICK_S = 0.25


FIRST_BACKOFF_S = 0.5


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

    def failed(self, max_backoff_s: float) -> float:
        """Count a failure; the backoff before the next attempt, in seconds."""
        self.failures += 1
        backoff = min(max_backoff_s, FIRST_BACKOFF_S * 2 ** (self.failures - 1))
        self.next_at = time.monotonic() + backoff * random.uniform(0.8, 1.0)
        return backoff


class Dialer:
    """``wanted()`` names the addresses to dial now; ``dial(address)`` links to one.

    ``dial`` returns False when the address turns out to be this node (it is never dialed again)
    and raises MycellmError, ValueError or OSError when it fails (the next try backs off).
    """

    def __init__(
        self, wanted: Callable[[], list[str]], dial: Callable[[str], Awaitable[bool]], max_backoff_s: float
    ) -> None:
        self._wanted = wanted
        self._dial = dial
        self._max_backoff_s = max_backoff_s
        self._attempts: dict[str, _Attempts] = {}

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for address in self._wanted():
                attempts = self._attempts.setdefault(address, _Attempts())
                if attempts.due(now):
                    attempts.start(self._try(address, attempts))
            await asyncio.sleep(DIAL_TICK_S)

    async def _try(self, address: str, attempts: _Attempts) -> None:
        try:
            attempts.succeeded(is_self=not await self._dial(address))
        except (MycellmError, ValueError, OSError) as error:
            backoff = attempts.failed(self._max_backoff_s)
            logger.info("dial %s failed (%s); next try in %.1f s", address, error, backoff)

    def stop(self) -> None:
        for attempts in self._attempts.values():
            if attempts.task is not None:
                attempts.task.cancel()
