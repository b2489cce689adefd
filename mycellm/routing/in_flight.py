"""Requests in flight on this node's own workers, as one router counts them, so that ranking
spreads concurrent requests over the workers of a model (one per GPU) instead of sending all of
them to the first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mycellm.routing.ranking import Route


class InFlight:
    """The requests a router has placed on each local worker and not seen end."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._placed: dict[str, str] = {}  # request id -> the worker it was placed on

    def weigh(self, routes: Iterable[Route]) -> list[Route]:
        """``routes`` with each local route's load set to the requests placed on it."""
        return [
            route.model_copy(update={"load": self._counts[route.target]}) if route.kind == "local" else route
            for route in routes
        ]

    def placed(self, request_id: str, route: Route) -> None:
        """``request_id`` goes to ``route`` first (a local one counts until ``ended``)."""
        if route.kind == "local" and request_id not in self._placed:
            self._placed[request_id] = route.target
            self._counts[route.target] += 1

    def ended(self, request_id: str) -> None:
        target = self._placed.pop(request_id, None)
        if target is not None:
            self._counts[target] -= 1
            if self._counts[target] <= 0:
                del self._counts[target]

    def __getitem__(self, target: str) -> int:
        return self._counts[target]
