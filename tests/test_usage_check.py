"""A consumer never signs usage the answer cannot hold: a seeder that inflates it is refused payment.

Two real nodes over QUIC; the seeder's machine runs a modified engine that claims more tokens
than it generated (the attacker's code: the model's output itself is real). The consumer serves
the same model, so it also counts the answer with the model's own tokenizer.
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

    def __init__(self, engine: LlamaCppEngine, factor: float) -> None:
        self._engine, self.factor = engine, factor

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelInfo]:
        return self._engine.models()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._engine.generate(request):
            if chunk.usage is not None:
                usage = Usage(
                    prompt_tokens=chunk.usage.prompt_tokens,
                    completion_tokens=int(chunk.usage.completion_tokens * self.factor),
                )
                chunk = chunk.model_copy(update={"usage": usage})
            yield chunk

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._engine.embed(request)

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        return await self._engine.count_tokens(request, text)


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture
def inflating(engine: LlamaCppEngine) -> InflatingEngine:
    return InflatingEngine(engine, 10)


@pytest.fixture
async def pair(
    tmp_path: Path, engine: LlamaCppEngine, inflating: InflatingEngine
) -> AsyncIterator[list[tuple[PeerService, CreditBook]]]:
    network_id = NetworkId(shared_network(tmp_path, CREDITS).network_id)
    nodes, stores = [], []
    for name, engines in (("consumer", [engine]), ("seeder", [inflating])):
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


def test_a_count_by_the_tokenizer_closes_the_bounds() -> None:
    request = GenerationRequest(
        request_id=RequestId("r"), model="m", prompt="Hi", max_tokens=500, stop=("END",)
    )
    counted = Usage(prompt_tokens=3, completion_tokens=100)
    bounds = usage_bounds(request, 400, counted)
    # 100 counted, 5% for sampled splits, 2 silent, 4 of slack, the 3 bytes of the stop string.
    assert bounds.completion_tokens == 114 and usage_bounds(request, 400).completion_tokens == 402
    assert bounds.prompt_tokens == 3 + 32
    assert inflated(request, Usage(prompt_tokens=3, completion_tokens=114), 400, counted) is None
    refused = inflated(request, Usage(prompt_tokens=3, completion_tokens=115), 400, counted) or ""
    assert "100 tokens by this node's tokenizer" in refused
    # The byte bound still holds where it is the tighter one.
    assert usage_bounds(request, 10, counted).completion_tokens == 12


@pytest.mark.parametrize("factor", [1.0, 2.0])
async def test_usage_is_checked_token_for_token_where_the_consumer_has_the_model(
    pair: list[tuple[PeerService, CreditBook]],
    engine: LlamaCppEngine,
    inflating: InflatingEngine,
    factor: float,
) -> None:
    """Twice the tokens still fits the bytes received (English runs about four bytes a token), so
    only the tokenizer's count catches it; an honest seeder, sampling freely, is paid."""
    inflating.factor = factor
    (consumer, consumer_book), (seeder, seeder_book) = pair
    request = GenerationRequest(
        request_id=RequestId(f"counted-{next(NUMBERS)}"),
        model=engine.models()[0].name,
        messages=({"role": "user", "content": "Describe a lighthouse in three sentences."},),
        max_tokens=400,
        temperature=1.2,
        seed=7,
    )
    result = await consumer.complete(seeder.peer_id, request)
    generated = (await engine.count_tokens(request, result.text)) or Usage(
        prompt_tokens=0, completion_tokens=0
    )
    assert 20 < generated.completion_tokens < 200, result.finish_reason
    assert (
        usage_bounds(request, len(result.text.encode())).completion_tokens >= 2 * generated.completion_tokens
    )
    assert consumer.settler is not None
    await consumer.settler.drain()
    request_id = RequestId(request.request_id)
    if factor == 1.0:
        await wait_for(lambda: seeder_book.is_settled(request_id), 10, "the honest seeder's receipt")
        assert await consumer_book.is_settled(request_id)
    else:
        await asyncio.sleep(0.5)  # a receipt offer, had there been one, would be settled by now
        assert not await seeder_book.is_settled(request_id)
        assert not await consumer_book.is_settled(request_id)
        assert result.usage.completion_tokens < 2 * generated.completion_tokens
        record = consumer.registry.get(seeder.peer_id)
        assert record is not None and record.receipts_missed > 0.9
