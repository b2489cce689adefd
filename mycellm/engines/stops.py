"""Stop-string matching over streamed text: emit what cannot start a stop string, hold back the rest."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back the text safe to emit. ``stopped`` turns True at the first stop."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        held = self._held + text
        first = min((index for index in (held.find(stop) for stop in self._stops) if index >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            self._held = ""
            return held[:first]
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for size in range(min(self._longest - 1, len(held)), 0, -1):
            tail = held[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                keep = size
                break
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The text held back when the generation ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
