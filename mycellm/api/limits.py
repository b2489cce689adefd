"""In-memory limits of the ingress: the lockout of sources that keep failing, and each key's requests per minute.

Both are bounded. The lockout's table holds at most ``max_sources`` addresses; an address is kept
until ``max(window, lockout)`` after its last failure, and the table is ordered by last failure,
so the expired ones are at its front. When the table is full of live entries, a failure from an
address it does not hold is refused as if that address were locked (429): a flood of addresses
never evicts a live lockout, and a caller with a valid key, which does not fail, is not affected.
The rate window keeps one timestamp per request of the last minute, so at most ``rpm`` of them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from mycellm.errors import RateLimitedError

MINUTE_S = 60.0


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(seconds))


@dataclass
class _Failures:
    window_started: float
    count: int
    last: float
    locked_until: float = 0.0


class FailureLockout:
    """Counts refused credentials per source address; ``failures`` of them within ``window_s`` lock it for ``lockout_s``.

    ``failures`` 0 turns the lockout off (behind a proxy every caller has the proxy's address).
    """

    def __init__(self, failures: int, window_s: float, lockout_s: float, max_sources: int) -> None:
        self._limit = failures
        self._window_s = window_s
        self._lockout_s = lockout_s
        self._max_sources = max_sources
        self._sources: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, source: str, now: float) -> None:
        """RateLimitedError (429, Retry-After) while ``source`` is locked out."""
        entry = self._sources.get(source)
        if entry is not None and entry.locked_until > now:
            raise self._locked(entry.locked_until - now)

    def fail(self, source: str, now: float) -> RateLimitedError | None:
        """Count one refused credential; the 429 to answer instead of the 401 when it locked the source."""
        if self._limit <= 0:
            return None
        entry = self._sources.pop(source, None)
        if entry is None:
            self._forget_expired(now)
            if len(self._sources) >= self._max_sources:
                return self._locked(self._window_s)  # full of live entries: refuse the newcomer
            entry = _Failures(window_started=now, count=0, last=now)
        if now - entry.window_started > self._window_s:
            entry.window_started, entry.count = now, 0
        entry.count += 1
        entry.last = now
        self._sources[source] = entry  # to the end: the table stays ordered by last failure
        if entry.count >= self._limit:
            entry.locked_until = now + self._lockout_s
            return self._locked(self._lockout_s)
        return None

    def _forget_expired(self, now: float) -> None:
        keep_s = max(self._window_s, self._lockout_s)
        while self._sources:
            source, entry = next(iter(self._sources.items()))
            if entry.last + keep_s > now:
                return
            del self._sources[source]

    def _locked(self, seconds: float) -> RateLimitedError:
        return RateLimitedError(
            f"too many failed authentications from this address; try again in {retry_after(seconds)} s",
            code="too_many_failures",
            retry_after_s=seconds,
        )


class RateWindow:
    """Requests per minute of each key: a sliding window of the last minute's request times."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}

    def admit(self, key_id: str, rpm: int, now: float) -> None:
        """Count one request of ``key_id``; RateLimitedError (429, Retry-After) over ``rpm``."""
        times = self._times.get(key_id)
        if times is None or times.maxlen != rpm:
            times = self._times[key_id] = deque(times or (), maxlen=rpm)
        while times and times[0] <= now - MINUTE_S:
            times.popleft()
        if len(times) >= rpm:
            wait = times[0] + MINUTE_S - now
            raise RateLimitedError(
                f"API key {key_id} is over its limit of {rpm} requests per minute; "
                f"try again in {retry_after(wait)} s",
                retry_after_s=wait,
            )
        times.append(now)

    def forget(self, known: set[str]) -> None:
        """Drop the windows of keys that are gone (revoked, or no longer limited)."""
        for key_id in set(self._times) - known:
            del self._times[key_id]
