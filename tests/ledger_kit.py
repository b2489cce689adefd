"""Helpers for credit-ledger tests: identities of the parties and receipts signed by them."""

from __future__ import annotations

import time
from pathlib import Path

from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.receipts import Receipt, countersign, draft_terms, sign_as_consumer

NETWORK = "test-network"


def parties(root: Path, *names: str) -> dict[str, NodeIdentity]:
    return {name: load_or_create_identity(root / name, node_name=name) for name in names}


def make_receipt(
    prices: PriceTable,
    consumer: NodeIdentity,
    seeder: NodeIdentity,
    request_id: str,
    *,
    relays: tuple[NodeIdentity, ...] = (),
    prompt_tokens: int = 40,
    completion_tokens: int = 100,
    model: str = "SmolLM2-135M-Instruct",
    tier: str | None = "fast",
    network_id: str = NETWORK,
    hold: tuple[int, int, int] | None = None,
) -> Receipt:
    started = int(time.time() * 1000) - 500
    terms = draft_terms(
        prices,
        request_id=request_id,
        network_id=network_id,
        model=model,
        tier=tier,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        consumer=consumer.certificate,
        seeder=seeder.certificate,
        relays=tuple(relay.certificate for relay in relays),
        started_at_ms=started,
        hold=hold,
    )
    encoded, signature = sign_as_consumer(terms, consumer)
    return countersign(encoded, signature, seeder)
