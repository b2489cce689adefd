"""Resuming a broken generation: the continuation budget, its stop matcher, the refusal."""

from __future__ import annotations

from mycellm.engines.stops import StopMatcher
from mycellm.errors import EngineError

RESUME_UNSUPPORTED = "resume_unsupported"  # the error code of an engine that cannot resume a request


def resume_refused(reason: str) -> EngineError:
    """The error an engine raises for a continuation it cannot honour."""
    return EngineError(reason, code=RESUME_UNSUPPORTED)


def continuation_budget(max_tokens: int | None, continuation_tokens: int, room: int) -> int:
    """New tokens a resumed generation may produce: what max_tokens leaves after the continuation,
    at most the room left in the context window; zero or less means it must end at once."""
    if max_tokens is None:
        return room
    return min(max_tokens - continuation_tokens, room)


class ContinuationStopMatcher:
    """A StopMatcher for a resumed generation that never emits the continuation again.

    It starts with the tail of the continuation in its history (at most the longest stop string
    less one character: enough for any stop string that straddles the boundary), so a stop that
    begins in the continuation and ends in new text still stops. Whatever of that tail the matcher
    holds back and later releases was already sent by the earlier attempt, so it is dropped.
    """

    def __init__(self, stops: tuple[str, ...] | list[str], continuation: str = "") -> None:
        self._matcher = StopMatcher(stops)
        longest = max((len(stop) for stop in stops if stop), default=0)
        tail = continuation[max(0, len(continuation) - (longest - 1)) :] if longest > 1 else ""
        self._already_sent = len(tail) - len(self._matcher.feed(tail))

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def feed(self, text: str) -> str:
        return self._drop_already_sent(self._matcher.feed(text))

    def flush(self) -> str:
        return self._drop_already_sent(self._matcher.flush())

    def _drop_already_sent(self, text: str) -> str:
        # The matcher releases text in order, so the held tail of the continuation comes first.
        dropped = min(self._already_sent, len(text))
        self._already_sent -= dropped
        return text[dropped:]
