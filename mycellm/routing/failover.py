"""One generation over ranked routes: failover before the first output, resume after it.

Ray-free: a route is reached through a ``RouteTarget`` (an InferenceWorker over Ray, a peer over
QUIC, an engine in this process). The ingress streams a client's request with it, and a node
serving a peer streams the peer's request over its own workers with it, so both fall back alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

from mycellm.errors import EngineError, MycellmError, NoRouteError, RequestCancelledError
from mycellm.routing.ranking import Route
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    RequestId,
    Usage,
)

logger = logging.getLogger(__name__)

PULL_WAIT_S = 30.0  # how long one pull waits for text before it asks again
DISCONNECT_CHECK_S = 0.25  # how often a stream asks whether its reader is still there

Result = TypeVar("Result")


class RouteTarget(Protocol):
    """The calls every route kind answers; a failure of the route itself raises EngineError."""

    async def open(self, request: GenerationRequest, wait_s: float) -> GenerationChunk: ...

    async def pull(self, request_id: RequestId, wait_s: float) -> GenerationChunk | None: ...

    def cancel(self, request_id: RequestId) -> None: ...  # best effort, returns at once

    # Pay a route that broke mid-stream for what the reader received of it (best effort, at once).
    def settle_broken(self, request_id: RequestId, usage: Usage) -> None: ...

    async def complete(self, request: GenerationRequest) -> CompletionResult: ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


class RequestProgress(Protocol):
    """What a run reports as it goes (the ingress's RequestTally is one)."""

    route: Route | None
    model: str

    def mark_first_token(self) -> None: ...

    def count(self, usage: Usage) -> None: ...


TargetFor = Callable[[Route], RouteTarget]
RouteFailed = Callable[[Route, EngineError], None]


def _ignore(route: Route, error: EngineError) -> None:
    """The default RouteFailed: nothing to do beyond the log line."""


async def try_routes(
    routes: list[Route],
    progress: RequestProgress,
    call: Callable[[Route], Awaitable[Result]],
    on_failure: RouteFailed = _ignore,
) -> tuple[Result, Route]:
    """Run ``call`` on the best route; when the route fails (EngineError), on the next one."""
    last_error: MycellmError | None = None
    for route in routes:
        progress.route, progress.model = route, route.model.name
        try:
            return await call(route), route
        except EngineError as error:
            logger.warning("route %s:%s failed before output: %s", route.kind, route.target, error.message)
            last_error = error
            on_failure(route, error)
    raise last_error or NoRouteError("no route could serve the request")


async def complete_on(
    generation: GenerationRequest,
    routes: list[Route],
    target_for: TargetFor,
    progress: RequestProgress,
    on_failure: RouteFailed = _ignore,
) -> tuple[CompletionResult, Route]:
    """A whole answer from the first route that gives one."""

    async def complete(route: Route) -> CompletionResult:
        target = target_for(route)
        request = generation.model_copy(update={"model": route.model.name})
        try:
            return await target.complete(request)
        except asyncio.CancelledError:
            target.cancel(generation.request_id)
            raise

    result, route = await try_routes(routes, progress, complete, on_failure)
    progress.mark_first_token()
    progress.count(result.usage)
    return result, route


async def embed_on(
    request: EmbeddingRequest,
    routes: list[Route],
    target_for: TargetFor,
    progress: RequestProgress,
    on_failure: RouteFailed = _ignore,
) -> tuple[EmbeddingResult, Route]:
    """Embeddings from the first route that gives them."""

    async def embed(route: Route) -> EmbeddingResult:
        return await target_for(route).embed(request.model_copy(update={"model": route.model.name}))

    result, route = await try_routes(routes, progress, embed, on_failure)
    progress.mark_first_token()
    progress.count(Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0))
    return result, route


def settle_broken(broken: list[tuple[RouteTarget, RequestId, int]], usage: Usage) -> None:
    """Bill each route that broke mid-stream for its share of the continuation the last route was
    given (``usage.continuation_tokens``, split by the characters each sent): the prompt, and the
    text of the routes before it, as prompt; its own text as completion."""
    characters = sum(sent for _, _, sent in broken)
    if not broken or characters == 0:
        return
    given, left = usage.prompt_tokens, usage.continuation_tokens
    for index, (target, request_id, sent) in enumerate(broken):
        share = left if index == len(broken) - 1 else round(usage.continuation_tokens * sent / characters)
        share = min(share, left)
        left -= share
        try:
            target.settle_broken(request_id, Usage(prompt_tokens=given, completion_tokens=share))
        except Exception as error:  # best effort: the route is gone or unreachable
            logger.warning("could not settle the broken part %s: %s", request_id, error)
        given += share


class RoutedStream:
    """A streamed generation on the best route that opens, resumed on the next if it breaks.

    ``open`` returns once a route gave the first chunk (errors before any output raise, so the
    caller can answer them plainly). ``chunks`` yields that chunk and then whatever the route has
    gathered at each pull, at most every ``pull_interval_s``. When the route fails mid-stream, the
    generation goes on from the text already yielded on the next route (``continuation``), so the
    reader sees one unbroken stream with exact usage; a stream that has sent tool calls is not
    resumed. ``reader_left`` is asked every DISCONNECT_CHECK_S; when it says yes, the stream ends
    with RequestCancelledError. Leaving the stream before its end cancels the generation.
    """

    def __init__(
        self,
        generation: GenerationRequest,
        routes: list[Route],
        target_for: TargetFor,
        progress: RequestProgress,
        *,
        open_wait_s: float,
        pull_interval_s: float = 0.0,
        on_failure: RouteFailed = _ignore,
    ) -> None:
        self._generation = generation
        self._routes = routes
        self._target_for = target_for
        self._progress = progress
        self._open_wait_s = open_wait_s
        self._pull_interval_s = pull_interval_s
        self._on_failure = on_failure
        self._first: GenerationChunk | None = None
        self._current: tuple[RouteTarget, RequestId] | None = None  # the target and the id it knows
        self.route: Route | None = None
        self.finished = False

    async def open(self) -> Route:
        self._first, self.route = await self._open_on(self._generation, self._routes)
        return self.route

    async def _open_on(
        self, generation: GenerationRequest, routes: list[Route]
    ) -> tuple[GenerationChunk, Route]:
        async def open_route(route: Route) -> GenerationChunk:
            target = self._target_for(route)
            request = generation.model_copy(update={"model": route.model.name})
            try:
                first = await target.open(request, self._open_wait_s)
            except asyncio.CancelledError:
                target.cancel(generation.request_id)
                raise
            self._current = (target, generation.request_id)
            return first

        first, route = await try_routes(routes, self._progress, open_route, self._on_failure)
        self._progress.mark_first_token()
        return first, route

    async def chunks(
        self, reader_left: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncGenerator[GenerationChunk, None]:
        assert self.route is not None and self._current is not None, "open the stream first"
        chunk, route = self._first, self.route
        remaining = self._routes[self._routes.index(route) + 1 :]
        produced: list[str] = []
        # Routes that broke, and what they sent; where the current route's text starts in produced.
        broken: list[tuple[RouteTarget, RequestId, int]] = []
        segment_start = 0
        tool_calls_sent = False
        checked_at = sent_at = time.monotonic()
        try:
            while True:
                if chunk is not None:
                    if chunk.text or chunk.tool_calls or chunk.finish_reason:
                        produced.append(chunk.text)
                        tool_calls_sent = tool_calls_sent or bool(chunk.tool_calls)
                        if chunk.is_final:
                            self.finished = True
                            if chunk.usage is not None:
                                self._progress.count(chunk.usage)
                                settle_broken(broken, chunk.usage)
                        yield chunk
                        sent_at = time.monotonic()
                    if chunk.is_final:
                        return
                now = time.monotonic()
                if reader_left is not None and now - checked_at > DISCONNECT_CHECK_S:
                    # A reader that left is not always noticed while we wait on the route; asking
                    # a few times a second makes the cancellation prompt and cheap.
                    checked_at = now
                    if await reader_left():
                        raise RequestCancelledError(f"the reader of {self._generation.request_id} left")
                pause = self._pull_interval_s - (now - sent_at)
                if pause > 0:
                    await asyncio.sleep(pause)
                target, current = self._current
                try:
                    chunk = await target.pull(current, PULL_WAIT_S)
                except EngineError as error:
                    if not remaining or tool_calls_sent:
                        raise
                    logger.warning(
                        "route %s:%s broke mid-stream: %s", route.kind, route.target, error.message
                    )
                    self._on_failure(route, error)
                    broken.append((target, current, sum(map(len, produced[segment_start:]))))
                    segment_start = len(produced)
                    chunk, route, remaining = await self._resume("".join(produced), remaining)
        finally:
            if not self.finished:
                self.cancel()

    async def _resume(
        self, continuation: str, remaining: list[Route]
    ) -> tuple[GenerationChunk, Route, list[Route]]:
        """Go on from ``continuation`` on the best of ``remaining``: its first chunk, the route, and
        the routes left after it."""
        attempt = len(self._routes) - len(remaining)
        resumed = self._generation.model_copy(
            update={"request_id": f"{self._generation.request_id}-r{attempt}", "continuation": continuation}
        )
        chunk, route = await self._open_on(resumed, remaining)
        self.route = route
        return chunk, route, remaining[remaining.index(route) + 1 :]

    def cancel(self) -> None:
        """Stop the generation on the route serving it now (best effort; idempotent)."""
        if self._current is not None and not self.finished:
            target, current = self._current
            self._current = None
            try:
                target.cancel(current)
            except Exception as error:  # best effort; the worker's idle reaper is the backstop
                logger.warning("could not cancel %s: %s", current, error)
