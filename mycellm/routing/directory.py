"""What the ingress ranks on: every route this node can use and the networks they belong to.

The Resolver keeps one ``RouteSnapshot``; the ingress caches a copy and ranks a request on the
local routes and the peer routes of the request's network only (``rank_routes(network_id=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mycellm.config import PriceSettings
from mycellm.errors import NetworkNotFoundError
from mycellm.routing.ranking import Route
from mycellm.types import NetworkId

MIN_ID_PREFIX = 8


@dataclass(frozen=True, slots=True)
class NetworkEntry:
    """One network this node is in: its id, its name and the prices of its description."""

    network_id: NetworkId
    name: str
    prices: PriceSettings


@dataclass(frozen=True)
class RouteSnapshot:
    """The local routes, the peer routes of every network, and the node's networks (default first
    in ``default``; None: a node in no network, whose requests run locally only)."""

    routes: tuple[Route, ...] = ()
    networks: tuple[NetworkEntry, ...] = ()
    default: NetworkId | None = None
    _by_id: dict[str, NetworkEntry] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({entry.network_id: entry for entry in self.networks})

    def network(self, name_or_id: str, param: str | None = None) -> NetworkEntry:
        """The network called ``name_or_id``, with that id, or whose id starts with it (8+
        characters); NetworkNotFoundError (404) otherwise."""
        exact = self._by_id.get(name_or_id)
        if exact is not None:
            return exact
        matching = [entry for entry in self.networks if entry.name == name_or_id]
        if len(matching) != 1 and len(name_or_id) >= MIN_ID_PREFIX:
            prefix = name_or_id.lower()
            matching = [entry for entry in self.networks if entry.network_id.startswith(prefix)]
        if len(matching) == 1:
            return matching[0]
        known = ", ".join(f"{entry.name} ({entry.network_id[:12]})" for entry in self.networks) or "none"
        shown = name_or_id if len(name_or_id) <= 80 else name_or_id[:80] + "..."
        raise NetworkNotFoundError(
            f"this node is in no single network called {shown!r} (its networks: {known})", param=param
        )

    def default_network(self) -> NetworkEntry | None:
        return self._by_id.get(self.default) if self.default is not None else None

    def routes_of(self, network: NetworkEntry | None) -> list[Route]:
        """The local routes and the peer routes of ``network`` (None: local routes only)."""
        chosen = network.network_id if network is not None else None
        return [route for route in self.routes if route.network_id is None or route.network_id == chosen]
