"""A consumer never signs usage the answer cannot hold: a seeder that inflates it is refused payment.

Two real nodes over QUIC; the seeder's machine runs a modified engine that claims ten times the
tokens it generated (the attacker's code: the model's output itself is real).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mycellm.config import ModelSettings, PriceSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.store import Store
from mycellm.network.service import PeerService
from mycellm.network.usage_check import inflated, usage_bounds
from mycellm.types import (
    AccountId,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    NetworkId,
    RequestId,
    Usage,
)
from tests.peer_kit import peer_service, shared_network, wait_for

CREDITS = PriceSettings(tier_prices={"tiny": 1.0}, initial_grant=5.0)
NUMBERS = itertools.count()


class InflatingEngine:
    """The seeder's modified engine: real generation, usage claimed ``factor`` times over."""

    def __init__(self, engine: LlamaCppEngine, factor: int) -> None:
        self._engine, self._factor = engine, factor

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelInfo]:
        return self._engine.models()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._engine.generate(request):
            if chunk.usage is not None:
                usage = Usage(
                    prompt_tokens=chunk.usage.prompt_tokens,
                    completion_tokens=chunk.usage.completion_tokens * self._factor,
                )
                chunk = chunk.model_copy(update={"usage": usage})
            yield chunk

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._engine.embed(request)


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture
async def pair(tmp_path: Path, engine: LlamaCppEngine) -> AsyncIterator[list[tuple[PeerService, CreditBook]]]:
    network_id = NetworkId(shared_network(tmp_path, CREDITS).network_id)
    nodes, stores = [], []
    for name, engines in (("consumer", [engine]), ("seeder", [InflatingEngine(engine, 10)])):
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}")
        book = CreditBook(store.engine, PriceTable(CREDITS), network_id)
        service = peer_service(tmp_path, name, engines, book, credits=CREDITS)  # type: ignore[arg-type]
        await service.start()
        nodes.append((service, book))
        stores.append(store)
    await nodes[1][0].connect(f"127.0.0.1:{nodes[0][0].port}")
    await wait_for(lambda: all(node.connected() for node, _ in nodes), 10, "the link")
    yield nodes
    for service, _ in nodes:
        await service.stop()
    for store in stores:
        await store.close()


def test_the_bounds_follow_the_text_and_max_tokens() -> None:
    request = GenerationRequest(
        request_id=RequestId("r"), model="m", messages=({"role": "user", "content": "Hi"},), max_tokens=50
    )
    assert usage_bounds(request, 10).completion_tokens == 12  # ten bytes, and two silent tokens
    assert usage_bounds(request, 1000).completion_tokens == 50  # never past max_tokens
    assert inflated(request, Usage(prompt_tokens=20, completion_tokens=12), 10) is None
    assert "completion tokens" in (inflated(request, Usage(prompt_tokens=20, completion_tokens=13), 10) or "")
    assert "prompt tokens" in (inflated(request, Usage(prompt_tokens=10_000, completion_tokens=1), 10) or "")
    # A resumed answer: the continuation an earlier attempt sent counts as received.
    resumed = request.model_copy(update={"continuation": "x" * 30})
    assert usage_bounds(resumed, 10).completion_tokens == 42


async def test_a_seeder_that_inflates_its_usage_is_not_paid(
    pair: list[tuple[PeerService, CreditBook]], engine: LlamaCppEngine
) -> None:
    (consumer, consumer_book), (seeder, seeder_book) = pair
    before = await consumer_book.balance(AccountId(consumer.identity.account_id))
    request = GenerationRequest(
        request_id=RequestId(f"inflated-{next(NUMBERS)}"),
        model=engine.models()[0].name,
        messages=({"role": "user", "content": "Count from one to twenty."},),
        max_tokens=40,
        temperature=0,
    )
    result = await consumer.complete(seeder.peer_id, request)
    # The client is shown what the answer can hold, not the claim.
    assert result.usage.completion_tokens <= min(40, len(result.text.encode()) + 2)
    assert consumer.settler is not None and seeder.settler is not None
    await consumer.settler.drain()
    await asyncio.sleep(0.5)  # a receipt offer, had there been one, would be settled by now
    assert not await seeder_book.is_settled(RequestId(request.request_id))
    assert not await consumer_book.is_settled(RequestId(request.request_id))
    assert await consumer_book.balance(AccountId(consumer.identity.account_id)) == before
    # The hold ended with a release; the refusal counts against the seeder.
    (kind, _), *_ = await consumer_book.recent_ends(AccountId(consumer.identity.account_id), 1)
    assert kind == "release"
    record = consumer.registry.get(seeder.peer_id)
    assert record is not None and record.receipts_missed > 0.9 and record.failures > 0.9
