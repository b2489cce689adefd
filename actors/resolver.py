"""Resolver: owns the table of every route this node can use (ranking is mycellm.routing's)."""

from __future__ import annotations

from mycellm.engines.base import ModelInfo
from mycellm.routing import Route


class Resolver:
    """Local workers register now; peers, chains and fleet nodes will register the same way.

    Readers (the ingress) copy the table and rank it with ``mycellm.routing.rank_routes``, so no
    request waits on this actor.
    """

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str, str], Route] = {}

    async def register_worker(self, worker_name: str, models: list[ModelInfo]) -> None:
        for model in models:
            self._routes[("local", worker_name, model.name)] = Route(
                kind="local", target=worker_name, model=model
            )

    async def routes(self) -> list[Route]:
        return list(self._routes.values())
