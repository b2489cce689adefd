"""After a stream resumes on another seeder, each seeder is paid for what it produced.

Three real nodes over QUIC, one real model. The consumer streams a long answer from B; B goes
away mid-stream and C resumes it. C is paid for the tokens it generated, reading B's text as
prompt; B's share (the tokens the client received from it) is signed as pending terms, and
settles when B is back: B, restarted on its own database, still knows what it served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mycellm.config import ModelSettings, PriceSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms
from mycellm.ledger.store import Store
from mycellm.network.service import PeerService
from mycellm.routing.failover import RoutedStream
from mycellm.routing.ranking import Route
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    NetworkId,
    PeerId,
    RequestId,
    Usage,
)
from tests.peer_kit import peer_service, shared_network, wait_for

CREDITS = PriceSettings(tier_prices={"tiny": 1.0}, initial_grant=50.0)


class PeerTarget:
    """A route to one peer through this process's PeerService (what actors.targets does over Ray)."""

    def __init__(self, service: PeerService, peer_id: PeerId) -> None:
        self._service, self._peer_id = service, peer_id

    async def open(self, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        return await self._service.open(self._peer_id, request, wait_s)

    async def pull(self, request_id: RequestId, wait_s: float) -> GenerationChunk | None:
        return await self._service.pull(request_id, wait_s)

    def cancel(self, request_id: RequestId) -> None:
        asyncio.get_running_loop().create_task(self._service.cancel(request_id))

    def settle_broken(self, request_id: RequestId, usage: Usage) -> None:
        self._service.settle_broken(request_id, usage)

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        return await self._service.complete(self._peer_id, request)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise NotImplementedError


class Progress:
    route: Route | None = None
    model = ""

    def mark_first_token(self) -> None: ...

    def count(self, usage: Usage) -> None:
        self.usage = usage


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=1024, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[dict[str, Store]]:
    opened = {name: await Store.open(f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}") for name in "abc"}
    yield opened
    for store in opened.values():
        await store.close()


def _node(tmp_path: Path, name: str, engine: LlamaCppEngine, store: Store) -> tuple[PeerService, CreditBook]:
    network_id = NetworkId(shared_network(tmp_path, CREDITS).network_id)
    book = CreditBook(store.engine, PriceTable(CREDITS), network_id)
    return peer_service(tmp_path, f"node-{name}", [engine], book, credits=CREDITS), book


async def test_each_seeder_is_paid_for_what_it_produced(
    tmp_path: Path, engine: LlamaCppEngine, stores: dict[str, Store]
) -> None:
    (a, a_book), (b, b_book), (c, c_book) = (_node(tmp_path, name, engine, stores[name]) for name in "abc")
    for service in (a, b, c):
        await service.start()
    try:
        await b.connect(f"127.0.0.1:{a.port}")
        await c.connect(f"127.0.0.1:{a.port}")
        await wait_for(lambda: len(a.connected()) == 2, 10, "A linked to B and C")
        model = engine.models()[0]
        request = GenerationRequest(
            request_id=RequestId("billed-1"),
            model=model.name,
            prompt="1, 2, 3, 4, 5, 6, 7, 8,",
            max_tokens=120,
            temperature=0,
        )
        routes = [Route(kind="peer", target=peer.peer_id, model=model) for peer in (b, c)]
        stream = RoutedStream(
            request, routes, lambda route: PeerTarget(a, PeerId(route.target)), Progress(), open_wait_s=60
        )
        await stream.open()
        texts: list[str] = []
        final: GenerationChunk | None = None
        async for chunk in stream.chunks():
            texts.append(chunk.text)
            if len(texts) == 3:
                await b.stop()  # B goes away mid-stream: C resumes from what the client has
            if chunk.is_final:
                final = chunk
        assert final is not None and final.usage is not None
        usage = final.usage
        assert usage.completion_tokens == 120 and usage.continuation_tokens > 0
        assert stream.route is not None and stream.route.target == c.peer_id

        # C is paid for what it generated; B's text was prompt to it.
        resumed = RequestId("billed-1-r1")
        await wait_for(lambda: c_book.is_settled(resumed), 20, "C's receipt")
        c_receipt = await c_book.receipt(resumed)
        assert c_receipt is not None
        c_terms = ReceiptTerms.from_bytes(Receipt.from_bytes(c_receipt).terms)
        assert c_terms.completion_tokens == usage.completion_tokens - usage.continuation_tokens
        assert c_terms.prompt_tokens == usage.prompt_tokens + usage.continuation_tokens

        # B's share waits as signed terms until B is back.
        await wait_for(lambda: a_book.pending_offers(b.peer_id), 10, "the terms owed to B")
        (pending,) = await a_book.pending_offers(b.peer_id)
        b_terms = ReceiptTerms.from_bytes(pending[1])
        assert pending[0] == "billed-1"
        assert b_terms.completion_tokens == usage.continuation_tokens
        assert b_terms.prompt_tokens == usage.prompt_tokens
        assert b_terms.completion_tokens + c_terms.completion_tokens == usage.completion_tokens

        # B comes back on its own database: it still knows it served billed-1, and settles it.
        b, _ = _node(tmp_path, "b", engine, stores["b"])
        await b.start()
        await b.connect(f"127.0.0.1:{a.port}")
        await wait_for(lambda: b_book.is_settled(RequestId("billed-1")), 20, "B's receipt after its restart")

        async def paid_on_a() -> bool:
            return await a_book.is_settled(RequestId("billed-1")) and not await a_book.pending_offers(
                b.peer_id
            )

        await wait_for(paid_on_a, 10, "A's copy of B's receipt")
        for store, book in ((stores["a"], a_book), (stores["b"], b_book), (stores["c"], c_book)):
            report = await audit(store.engine, book.prices, book.network_id)
            assert report.ok, report.problems[:5]
    finally:
        for service in (a, b, c):
            await service.stop()
