"""Pure ranking of routes for a model: which node/worker should answer, in order of preference."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mycellm.errors import ModelNotFoundError, RoutingConstraintError
from mycellm.types import ModelInfo

RouteKind = Literal["local", "peer", "chain", "fleet"]
Capability = Literal["chat", "embeddings"]


TIER_SCORES: dict[str, float] = {"frontier": 100.0, "capable": 60.0, "fast": 30.0, "tiny": 10.0}


UNKNOWN_TIER_SCORE = 30.0


SOURCE_WEIGHTS: dict[str, float] = {"local": 1.5, "peer": 1.2, "chain": 1.1, "fleet": 1.0}


AUTO_MODEL = "auto"


class Route(BaseModel):
    """One way to serve a model: a local worker, a peer, a chain of peers, or a fleet node."""

    model_config = ConfigDict(frozen=True)

    kind: RouteKind
    target: str  # worker name, peer id, or fleet URL
    model: ModelInfo
    latency_ms: float = Field(default=0.0, ge=0)
    load: int = Field(default=0, ge=0)  # requests in flight
    success_rate: float = Field(default=1.0, ge=0, le=1)
    hops: int = Field(default=0, ge=0)
    network_id: str | None = None  # the network a peer route serves; None: this node (any network)


class RoutingOptions(BaseModel):
    """The ``mycellm`` object a client may put in a request body."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_tier: Literal["frontier", "capable", "fast", "tiny"] | None = None
    required_tags: tuple[str, ...] = ()
    prefer: Literal["local", "peer"] | None = None
    fallback: Literal["next", "fail"] = "next"
    network: str | None = Field(default=None, min_length=1, max_length=128)  # a name or an id


def tier_score(model: ModelInfo) -> float:
    return TIER_SCORES.get(model.tier or "", UNKNOWN_TIER_SCORE)


def route_score(route: Route) -> float:
    """Higher is better: tier x source x health, discounted by load and latency."""
    health = route.success_rate / (1.0 + 0.25 * route.load) / (1.0 + route.latency_ms / 1000.0)
    return tier_score(route.model) * SOURCE_WEIGHTS[route.kind] * health


def rank_routes(
    routes: Iterable[Route],
    model: str,
    options: RoutingOptions | None = None,
    *,
    capability: Capability = "chat",
    network_id: str | None = None,
) -> list[Route]:
    """Routes able to serve ``model`` (or the best model for ``auto``), best first.

    With ``network_id`` only this node's own routes and the peer routes of that network count: a
    request is never routed to a node outside its network.

    Raises ModelNotFoundError when nothing serves the model and RoutingConstraintError when
    something does but the options exclude every route (the message says which option).
    """
    options = options or RoutingOptions()
    capable = [
        route
        for route in routes
        if _has_capability(route.model, capability)
        and (route.network_id is None or network_id is None or route.network_id == network_id)
    ]
    if model != AUTO_MODEL:
        capable = [route for route in capable if route.model.name == model]
        if not capable:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist or is not served by this network.", param="model"
            )
    elif not capable:
        raise ModelNotFoundError(
            f"No model that supports {capability} is served by this network.", param="model"
        )
    eligible = capable
    if options.min_tier is not None:
        floor = TIER_SCORES[options.min_tier]
        eligible = [route for route in eligible if tier_score(route.model) >= floor]
        if not eligible:
            raise RoutingConstraintError(
                f"no route serves {model!r} at tier {options.min_tier} or above", param="mycellm.min_tier"
            )
    if options.required_tags:
        wanted = set(options.required_tags)
        eligible = [route for route in eligible if wanted.issubset(route.model.tags)]
        if not eligible:
            raise RoutingConstraintError(
                f"no route serves {model!r} with tags {sorted(wanted)}", param="mycellm.required_tags"
            )

    def key(route: Route) -> tuple[int, float]:
        preferred = options.prefer is not None and _matches_preference(route.kind, options.prefer)
        return (0 if preferred else 1, -route_score(route))

    ranked = sorted(eligible, key=key)
    if model == AUTO_MODEL:
        # "auto" answers with one model: the best-ranked one, on all its routes.
        best = ranked[0].model.name
        ranked = [route for route in ranked if route.model.name == best]
    return ranked


def _has_capability(model: ModelInfo, capability: str) -> bool:
    return model.supports_embeddings if capability == "embeddings" else model.supports_chat


def _matches_preference(kind: RouteKind, prefer: str) -> bool:
    return kind == "local" if prefer == "local" else kind != "local"
