"""Resolver: knows every route this node can use and ranks them for a request."""

from __future__ import annotations

from mycellm.engines.base import ModelInfo
from mycellm.routing import Route, RoutingOptions, rank_routes


class Resolver:
    """Holds the route table; local workers register now, peers, chains and fleet nodes later."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str, str], Route] = {}
        self._version = 0

    async def register_worker(self, worker_name: str, models: list[ModelInfo]) -> None:
        for model in models:
            self._routes[("local", worker_name, model.name)] = Route(
                kind="local", target=worker_name, model=model
            )
        self._version += 1

    async def remove_target(self, kind: str, target: str) -> None:
        for key in [key for key in self._routes if key[0] == kind and key[1] == target]:
            del self._routes[key]
        self._version += 1

    async def resolve(
        self, model: str, options: RoutingOptions | None = None, capability: str = "chat"
    ) -> list[Route]:
        return rank_routes(self._routes.values(), model, options, capability=capability)  # type: ignore[arg-type]

    async def routes(self) -> tuple[int, list[Route]]:
        """The whole table and its version (readers cache it and refresh when the version moves)."""
        return self._version, list(self._routes.values())
