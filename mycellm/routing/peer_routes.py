"""Routes through directly connected peers, built from what is known of each peer as plain values."""

from __future__ import annotations

from collections.abc import Iterable

from mycellm.routing.ranking import Route
from mycellm.types import ModelInfo, NetworkId, PeerId


def peer_routes(
    peer_id: PeerId,
    models: Iterable[ModelInfo],
    *,
    rtt_ms: float | None,
    load: int,
    reputation: float,
    network_id: NetworkId | None = None,
) -> list[Route]:
    """One route per model ``peer_id`` serves, one hop away.

    ``rtt_ms`` is the link's smoothed round trip (None before the first pong); ``reputation`` is
    the peer's decayed record of requests answered and receipts honoured, in 0..1 (1 for a
    newcomer), and stands for the route's success rate. ``network_id`` is the network the route
    serves (a peer's link serves the networks both nodes are members of; one route each). The
    models should carry the network's tiers, not the peer's claims (``NetworkTerms.priced``).
    """
    return [
        Route(
            kind="peer",
            target=peer_id,
            model=model,
            latency_ms=rtt_ms or 0.0,
            load=load,
            success_rate=reputation,
            hops=1,
            network_id=network_id,
        )
        for model in models
    ]
