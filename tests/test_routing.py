"""Tests for route ranking: tiers, sources, health, ``auto``, capabilities and routing options."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mycellm.errors import ModelNotFoundError, RoutingConstraintError
from mycellm.routing.in_flight import InFlight
from mycellm.routing.ranking import Route, RoutingOptions, rank_routes, route_score
from mycellm.types import ModelInfo


def model(name: str = "m", tier: str | None = "fast", **fields: Any) -> ModelInfo:
    return ModelInfo(name=name, backend="llama_cpp", tier=tier, **fields)


def route(kind: str, target: str, info: ModelInfo | None = None, **fields: Any) -> Route:
    return Route(kind=kind, target=target, model=info or model(), **fields)  # type: ignore[arg-type]


def targets(routes: list[Route]) -> list[str]:
    return [item.target for item in routes]


def test_local_ranks_before_peer_and_fleet_at_equal_tier() -> None:
    routes = [route("fleet", "https://fleet"), route("peer", "peer-1"), route("local", "worker-0")]
    assert targets(rank_routes(routes, "m")) == ["worker-0", "peer-1", "https://fleet"]


def test_higher_tier_outranks_local_source() -> None:
    routes = [
        route("local", "tiny-local", model(tier="tiny")),
        route("fleet", "frontier-fleet", model(tier="frontier")),
        route("peer", "capable-peer", model(tier="capable")),
        route("local", "fast-local", model(tier="fast")),
    ]
    assert targets(rank_routes(routes, "m")) == ["frontier-fleet", "capable-peer", "fast-local", "tiny-local"]


def test_load_discounts_score() -> None:
    idle = route("local", "idle")
    busy = route("local", "busy", load=4)
    assert route_score(busy) < route_score(idle)
    assert targets(rank_routes([busy, idle], "m")) == ["idle", "busy"]


def test_heavy_load_lets_a_peer_win_over_local() -> None:
    local = route("local", "worker-0", load=8)
    peer = route("peer", "peer-1")
    assert targets(rank_routes([local, peer], "m")) == ["peer-1", "worker-0"]


def test_latency_discounts_score() -> None:
    near = route("peer", "near", latency_ms=10)
    far = route("peer", "far", latency_ms=2000)
    assert route_score(far) < route_score(near)
    assert targets(rank_routes([far, near], "m")) == ["near", "far"]


def test_success_rate_discounts_score() -> None:
    flaky = route("peer", "flaky", success_rate=0.2)
    steady = route("peer", "steady")
    assert targets(rank_routes([flaky, steady], "m")) == ["steady", "flaky"]


def test_rank_keeps_only_routes_for_the_named_model() -> None:
    routes = [
        route("local", "a", model("alpha")),
        route("peer", "b", model("beta")),
        route("peer", "c", model("alpha")),
    ]
    assert targets(rank_routes(routes, "alpha")) == ["a", "c"]


def test_auto_returns_only_the_best_models_routes() -> None:
    small = model("small", tier="tiny")
    big = model("big", tier="capable")
    routes = [
        route("local", "small-local", small),
        route("peer", "big-peer", big),
        route("fleet", "big-fleet", big),
        route("peer", "small-peer", small),
    ]
    ranked = rank_routes(routes, "auto")
    assert {item.model.name for item in ranked} == {"big"}
    assert targets(ranked) == ["big-peer", "big-fleet"]


def test_embeddings_capability_filters_models_without_embeddings() -> None:
    chat_only = model("chat-only", tier="frontier")
    embedder = model("embedder", tier="tiny", supports_embeddings=True)
    routes = [route("local", "chat", chat_only), route("peer", "embed", embedder)]
    assert targets(rank_routes(routes, "auto", capability="embeddings")) == ["embed"]
    with pytest.raises(ModelNotFoundError) as caught:
        rank_routes(routes, "chat-only", capability="embeddings")
    assert caught.value.param == "model"


def test_auto_with_no_capable_model_is_not_found() -> None:
    routes = [route("local", "chat", model("chat-only"))]
    with pytest.raises(ModelNotFoundError) as caught:
        rank_routes(routes, "auto", capability="embeddings")
    assert caught.value.param == "model"
    assert caught.value.status == 404


def test_unknown_model_is_not_found() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        rank_routes([route("local", "worker-0")], "no-such-model")
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message


def test_no_routes_at_all_is_not_found() -> None:
    with pytest.raises(ModelNotFoundError):
        rank_routes([], "m")


def test_min_tier_filters_lower_tiers() -> None:
    routes = [route("local", "tiny", model(tier="tiny")), route("peer", "capable", model(tier="capable"))]
    assert targets(rank_routes(routes, "m", RoutingOptions(min_tier="fast"))) == ["capable"]


def test_min_tier_excluding_everything_names_the_option() -> None:
    routes = [route("local", "worker-0", model(tier="fast"))]
    with pytest.raises(RoutingConstraintError) as caught:
        rank_routes(routes, "m", RoutingOptions(min_tier="frontier"))
    assert caught.value.param == "mycellm.min_tier"
    assert caught.value.status == 422
    assert "frontier" in caught.value.message


def test_required_tags_filter_routes() -> None:
    routes = [
        route("local", "plain", model(tags=("general",))),
        route("peer", "coder", model(tags=("code", "general"))),
    ]
    assert targets(rank_routes(routes, "m", RoutingOptions(required_tags=("code",)))) == ["coder"]


def test_required_tags_excluding_everything_names_the_option() -> None:
    routes = [route("local", "worker-0", model(tags=("general",)))]
    with pytest.raises(RoutingConstraintError) as caught:
        rank_routes(routes, "m", RoutingOptions(required_tags=("code", "general")))
    assert caught.value.param == "mycellm.required_tags"
    assert "code" in caught.value.message


def test_prefer_peer_puts_non_local_routes_first() -> None:
    routes = [
        route("local", "worker-0"),
        route("fleet", "https://fleet", latency_ms=500),
        route("peer", "peer-1"),
    ]
    ranked = rank_routes(routes, "m", RoutingOptions(prefer="peer"))
    assert targets(ranked) == ["peer-1", "https://fleet", "worker-0"]


def test_prefer_local_beats_a_better_peer() -> None:
    routes = [route("peer", "peer-1", model(tier="frontier")), route("local", "worker-0", model(tier="tiny"))]
    assert targets(rank_routes(routes, "m"))[0] == "peer-1"
    assert targets(rank_routes(routes, "m", RoutingOptions(prefer="local"))) == ["worker-0", "peer-1"]


def test_routing_options_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        RoutingOptions.model_validate({"prefer": "local", "fastest": True})


@pytest.mark.parametrize(
    "data",
    [
        {"min_tier": "huge"},
        {"prefer": "fleet"},
        {"fallback": "retry"},
        {"required_tags": "code"},
    ],
)
def test_routing_options_reject_bad_values(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RoutingOptions.model_validate(data)


def test_routing_options_accept_good_values() -> None:
    options = RoutingOptions.model_validate(
        {"min_tier": "capable", "required_tags": ["code"], "prefer": "peer"}
    )
    assert options.min_tier == "capable"
    assert options.required_tags == ("code",)
    assert options.fallback == "next"


def test_the_network_fixes_a_peers_tier_and_a_peer_may_only_claim_lower() -> None:
    from mycellm.network.settlement import NetworkTerms
    from mycellm.types import NetworkId

    terms = NetworkTerms(NetworkId("n" * 64), {"m": "fast", "other": "capable"}, None)
    assert terms.priced(model("m", tier="frontier")).tier == "fast"  # a claim above the network's
    assert terms.priced(model("m", tier=None)).tier == "fast"
    assert terms.priced(model("m", tier="tiny")).tier == "tiny"  # a server may rank its copy lower
    assert terms.priced(model("unlisted", tier="frontier")).tier == "tiny"  # unlisted: the lowest
    # A peer that lies about its tier never outranks a local worker of the model at the network's tier.
    routes = [
        route("peer", "liar", terms.priced(model("m", tier="frontier"))),
        route("local", "worker-0", model("m", tier="fast")),
    ]
    assert targets(rank_routes(routes, "m")) == ["worker-0", "liar"]


def test_requests_in_flight_spread_over_the_workers_of_a_model() -> None:
    workers = [route("local", f"worker-{index}") for index in range(3)]
    in_flight = InFlight()
    first = []
    for request in ("a", "b", "c", "d"):
        best = rank_routes(in_flight.weigh(workers), "m")[0]
        in_flight.placed(request, best)
        first.append(best.target)
    assert first == ["worker-0", "worker-1", "worker-2", "worker-0"]
    in_flight.ended("b")
    in_flight.ended("b")  # a second end of one request changes nothing
    assert rank_routes(in_flight.weigh(workers), "m")[0].target == "worker-1"
    assert [in_flight[f"worker-{index}"] for index in range(3)] == [2, 0, 1]
    # Peer routes keep the load their peer reported.
    peer = route("peer", "peer-1", load=7)
    assert in_flight.weigh([peer]) == [peer]
