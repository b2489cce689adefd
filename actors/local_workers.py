"""LocalWorkers: what peers are served from, this node's InferenceWorkers reached over Ray."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from actors.calls import call_actor
from actors.recorder import Recorder
from actors.targets import route_target
from mycellm.api.tally import RequestTally
from mycellm.errors import MycellmError
from mycellm.routing.failover import RoutedStream, embed_on
from mycellm.routing.in_flight import InFlight
from mycellm.routing.ranking import Route, rank_routes
from mycellm.types import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    PeerId,
    Usage,
)

# A peer's stream crosses four processes per chunk (worker, both PeerManagers, the ingress) on
# cores the engine also decodes on: gathering 50 ms of tokens per frame keeps that cost small.
PEER_CHUNK_INTERVAL_S = 0.05


class LocalWorkers:
    """The LocalServer a PeerService serves peers from: ranked local routes, with failover."""

    def __init__(
        self, workers: dict[str, Any], routes: list[Route], recorder: Recorder, timeout_s: float
    ) -> None:
        self._workers = workers
        self._routes = routes
        self._recorder = recorder
        self._timeout_s = timeout_s
        self.active = 0
        self._in_flight = InFlight()  # spreads peers' requests over the workers of a model

    def replace(self, workers: dict[str, Any], routes: list[Route]) -> None:
        """The workers now running (machines joined or left the cluster) and their routes."""
        self._workers, self._routes = dict(workers), list(routes)

    def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for route in self._routes:
            seen.setdefault(route.model.name, route.model)
        return list(seen.values())

    def load(self) -> int:
        return self.active

    def _target(self, route: Route) -> Any:
        return route_target(route, self._workers, None, self._timeout_s)

    async def generate(
        self, request: GenerationRequest, peer_id: PeerId
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The peer's generation on the best local worker, moving to the next if one fails."""
        served = RequestTally(request.request_id, request.kind, request.model)
        routes = rank_routes(self._in_flight.weigh(self._routes), request.model)
        self._in_flight.placed(request.request_id, routes[0])
        stream = RoutedStream(
            request,
            routes,
            self._target,
            served,
            open_wait_s=self._timeout_s,
            pull_interval_s=PEER_CHUNK_INTERVAL_S,
        )
        self.active += 1
        try:
            await stream.open()
            async with contextlib.aclosing(stream.chunks()) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException as error:
            if not stream.finished:  # closing the generator after its final chunk is no failure
                served.fail(error)
            raise
        finally:
            self.active -= 1
            self._in_flight.ended(request.request_id)
            stream.cancel()
            record = served.to_record()
            if record is not None:
                self._recorder.record(record)

    async def embed(self, request: EmbeddingRequest, peer_id: PeerId) -> EmbeddingResult:
        routes = rank_routes(self._routes, request.model, capability="embeddings")
        served = RequestTally(request.request_id, "embedding", request.model)
        result, _route = await embed_on(request, routes, self._target, served)
        return result

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """The first local worker of the request's model that has a tokenizer counts for it."""
        try:
            routes = rank_routes(self._routes, request.model)
        except MycellmError:  # this node does not serve the model
            return None
        for route in routes:
            worker = self._workers.get(route.target)
            if worker is None:
                continue
            try:
                usage: Usage | None = await call_actor(
                    worker.count_tokens.remote(request, text), self._timeout_s
                )
            except MycellmError:
                continue
            if usage is not None:
                return usage
        return None
