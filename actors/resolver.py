"""Resolver: owns the table of every route this node can use (ranking is mycellm.routing's)."""

from __future__ import annotations

from collections.abc import Sequence

from mycellm.routing.directory import NetworkEntry, RouteSnapshot
from mycellm.routing.ranking import Route
from mycellm.types import ModelInfo, NetworkId


class Resolver:
    """Contract: owns the route table (local routes by worker and model, peer routes as a whole).

    Callers: the node builder registers each local worker when it starts (registering the same
    worker and model again replaces its route: idempotent) and withdraws those of a machine that
    left (idempotent); the PeerManager replaces all peer
    routes (each of one network), the node's networks and its default network whenever links or
    networks change (last write wins); the ingress reads snapshots and ranks copies with
    ``mycellm.routing.ranking.rank_routes``, so no request waits on this actor.
    """

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str, str], Route] = {}
        self._peer_routes: list[Route] = []
        self._default_network: NetworkId | None = None
        self._networks: tuple[NetworkEntry, ...] = ()

    async def register_worker(self, worker_name: str, models: list[ModelInfo]) -> None:
        for model in models:
            self._routes[("local", worker_name, model.name)] = Route(
                kind="local", target=worker_name, model=model
            )

    async def unregister_worker(self, worker_name: str) -> None:
        """Withdraw a worker's routes (its machine left the cluster)."""
        self._routes = {key: route for key, route in self._routes.items() if key[1] != worker_name}

    async def set_peer_routes(
        self,
        routes: list[Route],
        default_network: NetworkId | None = None,
        networks: Sequence[NetworkEntry] = (),
    ) -> None:
        self._peer_routes = [route for route in routes if route.kind == "peer"]
        self._default_network = default_network
        self._networks = tuple(networks)

    async def snapshot(self) -> RouteSnapshot:
        """Every route (local, and the peer routes of every network) and the node's networks."""
        routes = (*self._routes.values(), *self._peer_routes)
        return RouteSnapshot(routes, self._networks, self._default_network)

    async def local_routes(self) -> list[Route]:
        return list(self._routes.values())
