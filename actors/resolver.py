"""Resolver: owns the table of every route this node can use (ranking is mycellm.routing's)."""

from __future__ import annotations

from mycellm.engines.base import ModelInfo
from mycellm.routing import Route


class Resolver:
    """Local workers register at start; the PeerManager replaces the peer routes as links change.

    Readers (the ingress) copy the table and rank it with ``mycellm.routing.rank_routes``, so no
    request waits on this actor.
    """

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str, str], Route] = {}
        self._peer_routes: list[Route] = []

    async def register_worker(self, worker_name: str, models: list[ModelInfo]) -> None:
        for model in models:
            self._routes[("local", worker_name, model.name)] = Route(
                kind="local", target=worker_name, model=model
            )

    async def set_peer_routes(self, routes: list[Route]) -> None:
        self._peer_routes = [route for route in routes if route.kind == "peer"]

    async def routes(self) -> list[Route]:
        return [*self._routes.values(), *self._peer_routes]

    async def local_routes(self) -> list[Route]:
        return list(self._routes.values())
