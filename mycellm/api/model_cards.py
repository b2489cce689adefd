"""OpenAI ``model`` objects for every model the reachable network serves, each listing where (which node)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mycellm.routing.ranking import Route


def model_cards(routes: Iterable[Route], node_peer_id: str, created: int) -> list[dict[str, Any]]:
    cards: dict[str, dict[str, Any]] = {}
    for route in routes:
        model = route.model
        card = cards.setdefault(
            model.name,
            {
                "id": model.name,
                "object": "model",
                "created": created,
                "owned_by": model.owned_by,
                "mycellm": {
                    "backend": model.backend,
                    "context_tokens": model.context_tokens,
                    "tier": model.tier,
                    "tags": list(model.tags),
                    "supports_embeddings": model.supports_embeddings,
                    "supports_tools": model.supports_tools,
                    "routes": [],
                },
            },
        )
        node = route.target if route.kind == "peer" else node_peer_id
        card["mycellm"]["routes"].append({"kind": route.kind, "target": route.target, "node": node})
    return list(cards.values())
