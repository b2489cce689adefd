"""Where a route's calls go: a local InferenceWorker, or the PeerManager on behalf of one peer."""

from __future__ import annotations

from typing import Any

import ray

from actors.calls import call_actor, cancel_quietly
from actors.follow import FollowedStream
from mycellm.errors import NoRouteError
from mycellm.routing.ranking import Route
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    Usage,
)


class ActorTarget:
    """A RouteTarget over an actor: an InferenceWorker, or the PeerManager for ``peer_id``."""

    def __init__(self, handle: Any, timeout_s: float, peer_id: str | None = None) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        # A worker is called with the request alone; the PeerManager also needs the peer's id.
        self._via: tuple[str, ...] = () if peer_id is None else (peer_id,)
        self._followed: dict[str, FollowedStream] = {}  # streams opened here, read as generators

    async def open(self, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        chunk: GenerationChunk = await call_actor(
            self._handle.open.remote(*self._via, request, wait_s), self._timeout_s
        )
        return chunk

    async def pull(self, request_id: str, wait_s: float) -> GenerationChunk | None:
        """What the stream delivered since the last pull, read from the actor's ``follow``."""
        followed = self._followed.get(request_id)
        if followed is None:
            followed = self._followed[request_id] = FollowedStream(self._handle.follow, request_id)
        try:
            return await followed.next(wait_s)
        finally:
            if followed.ended:
                self._followed.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        followed = self._followed.pop(request_id, None)
        cancel_quietly(self._handle.cancel, request_id)
        if followed is not None:
            followed.close()

    def settle_broken(self, request_id: str, usage: Usage) -> None:
        if self._via:  # a peer is paid for what it sent before it broke; local workers are free
            cancel_quietly(self._handle.settle_broken, request_id, usage)

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        result: CompletionResult = await call_actor(
            self._handle.complete.remote(*self._via, request), self._timeout_s
        )
        return result

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        result: EmbeddingResult = await call_actor(
            self._handle.embed.remote(*self._via, request), self._timeout_s
        )
        return result


class WorkerHandles:
    """A node's InferenceWorkers by name: those it started with, and those it started later on
    machines that joined its cluster (found by name in the node's namespace, then kept)."""

    def __init__(self, workers: dict[str, Any], namespace: str) -> None:
        self._known = dict(workers)
        self._namespace = namespace

    def get(self, name: str) -> Any | None:
        handle = self._known.get(name)
        if handle is None and name.startswith("worker-"):
            try:
                handle = ray.get_actor(name, namespace=self._namespace)
            except ValueError:  # not started, or withdrawn with its machine
                return None
            self._known[name] = handle
        return handle

    def names(self) -> list[str]:
        return list(self._known)


def route_target(route: Route, workers: Any, peer_manager: Any, timeout_s: float) -> ActorTarget:
    """The target of ``route``; ``workers`` maps worker names to handles (``get``)."""
    if route.kind == "local":
        worker = workers.get(route.target)
        if worker is None:
            raise NoRouteError(f"worker {route.target} is not known to this ingress")
        return ActorTarget(worker, timeout_s)
    if route.kind == "peer" and peer_manager is not None:
        return ActorTarget(peer_manager, timeout_s, route.target)
    raise NoRouteError(f"{route.kind} routes are not served by this node")
