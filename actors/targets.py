"""Where a route's calls go: a local InferenceWorker, or the PeerManager on behalf of one peer."""

from __future__ import annotations

from typing import Any

from mycellm.engines.base import EmbeddingRequest, GenerationRequest
from mycellm.errors import NoRouteError
from mycellm.routing import Route


class RouteTarget:
    """The same five calls for every route kind; each returns a Ray ObjectRef."""

    def __init__(self, handle: Any, peer_id: str | None = None) -> None:
        self._handle = handle
        self._peer_id = peer_id

    def open(self, request: GenerationRequest, wait_s: float) -> Any:
        if self._peer_id is None:
            return self._handle.open.remote(request, wait_s)
        return self._handle.open.remote(self._peer_id, request, wait_s)

    def pull(self, request_id: str, wait_s: float) -> Any:
        return self._handle.pull.remote(request_id, wait_s)

    def cancel(self, request_id: str) -> Any:
        return self._handle.cancel.remote(request_id)

    def complete(self, request: GenerationRequest) -> Any:
        if self._peer_id is None:
            return self._handle.complete.remote(request)
        return self._handle.complete.remote(self._peer_id, request)

    def embed(self, request: EmbeddingRequest) -> Any:
        if self._peer_id is None:
            return self._handle.embed.remote(request)
        return self._handle.embed.remote(self._peer_id, request)


def route_target(route: Route, workers: dict[str, Any], peer_manager: Any) -> RouteTarget:
    if route.kind == "local":
        worker = workers.get(route.target)
        if worker is None:
            raise NoRouteError(f"worker {route.target} is not known to this ingress")
        return RouteTarget(worker)
    if route.kind == "peer" and peer_manager is not None:
        return RouteTarget(peer_manager, route.target)
    raise NoRouteError(f"{route.kind} routes are not served by this node")
