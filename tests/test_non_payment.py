"""Payment is not optional, and a seeder's restart does not cancel a debt.

Two real nodes over QUIC, one real model. A consumer that takes answers and never signs their
receipts is counted as missing them once each receipt is overdue; its unpaid work counts as
consumed, so after the grace amount the seeder refuses it before any work. A receipt offered after
the seeder restarted still settles: what it served is kept in its database, not only in memory.
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
from mycellm.ledger.receipts import draft_terms, sign_as_consumer
from mycellm.ledger.store import Store
from mycellm.network.messages import (
    ChunkMessage,
    DoneMessage,
    ErrorMessage,
    InferenceMessage,
    ReceiptMessage,
    ReceiptOfferMessage,
)
from mycellm.network.service import PeerService
from mycellm.types import GenerationRequest, NetworkId, RequestId, Usage
from tests.peer_kit import peer_service, shared_network, wait_for

# A tenth of a credit of grace, and receipts due within half a second.
CREDITS = PriceSettings(
    tier_prices={"tiny": 100.0}, initial_grant=50.0, grace_credits=0.1, receipt_deadline_s=0.5
)
# After a restart a receipt is paid, and paid work is no freeloading: a grace large enough for two.
PATIENT = CREDITS.model_copy(update={"grace_credits": 1000.0})
NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


def _node(
    root: Path, name: str, engine: LlamaCppEngine, store: Store, credits: PriceSettings = CREDITS
) -> tuple[PeerService, CreditBook]:
    network_id = NetworkId(shared_network(root, credits).network_id)
    book = CreditBook(store.engine, PriceTable(credits), network_id)
    return peer_service(root, name, [engine], book, credits=credits), book


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[dict[str, Store]]:
    opened = {name: await Store.open(f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}") for name in ("c", "s")}
    yield opened
    for store in opened.values():
        await store.close()


async def _take_without_paying(
    consumer: PeerService, seeder: PeerService, model: str
) -> tuple[GenerationRequest, Usage | ErrorMessage, tuple[int, int, int]]:
    """A request with a valid hold, whose answer the consumer keeps and never pays for."""
    assert consumer.settler is not None
    request = GenerationRequest(
        request_id=RequestId(f"unpaid-{next(NUMBERS)}"),
        model=model,
        messages=({"role": "user", "content": "Say yes."},),
        max_tokens=4,
        temperature=0,
        network_id=consumer.settler.network_id,
    )
    info = next(item for item in consumer.session(seeder.peer_id).hello.models if item.name == model)
    admission = await consumer.settler.admit(request, info, seeder.peer_id)
    stream = consumer.session(seeder.peer_id).link.open_stream()
    stream.send(InferenceMessage(request=admission.request, hold=admission.hold.signed))
    while True:
        message = await stream.receive(60)
        if isinstance(message, DoneMessage | ErrorMessage):
            return (
                admission.request,
                message.usage if isinstance(message, DoneMessage) else message,
                admission.hold.terms,
            )
        assert isinstance(message, ChunkMessage), message


async def test_a_consumer_that_never_pays_is_counted_and_then_refused(
    tmp_path: Path, engine: LlamaCppEngine, stores: dict[str, Store]
) -> None:
    (consumer, _), (seeder, _) = (
        _node(tmp_path, "c", engine, stores["c"]),
        _node(tmp_path, "s", engine, stores["s"]),
    )
    await consumer.start()
    await seeder.start()
    try:
        await consumer.connect(f"127.0.0.1:{seeder.port}")
        await wait_for(lambda: seeder.connected(), 10, "the link")
        model = engine.models()[0].name
        _, first, _ = await _take_without_paying(consumer, seeder, model)
        assert isinstance(first, Usage), first

        def missed() -> float:
            record = seeder.registry.get(consumer.peer_id)
            return 0.0 if record is None else record.receipts_missed

        await wait_for(lambda: missed() > 0.9, 5, "the overdue receipt counted as missed")
        record = seeder.registry.get(consumer.peer_id)
        assert record is not None and record.consumed_credits > CREDITS.grace_credits  # the unpaid work
        # Past the grace, having served the seeder nothing: refused before any work.
        _, refused, _ = await _take_without_paying(consumer, seeder, model)
        assert isinstance(refused, ErrorMessage) and "serve more than" in refused.message, refused
    finally:
        await consumer.stop()
        await seeder.stop()


async def _offer(
    consumer: PeerService,
    seeder: PeerService,
    request: GenerationRequest,
    usage: Usage,
    hold: tuple[int, int, int],
) -> ReceiptMessage | ErrorMessage:
    """The consumer's signed terms for ``usage`` of ``request``, offered to the seeder; its answer."""
    assert consumer.settler is not None
    model = next(item for item in consumer.session(seeder.peer_id).hello.models if item.name == request.model)
    terms = draft_terms(
        PriceTable(PATIENT),
        request_id=request.request_id,
        network_id=consumer.settler.network_id,
        model=model.name,
        tier=model.tier,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        consumer=consumer.identity.certificate,
        seeder=seeder.identity.certificate,
        started_at_ms=0,
        hold=hold,
    )
    encoded, signature = sign_as_consumer(terms, consumer.identity)
    stream = consumer.session(seeder.peer_id).link.open_stream()
    stream.send(ReceiptOfferMessage(terms=encoded, consumer_signature=signature))
    reply = await stream.receive(10)
    assert isinstance(reply, ReceiptMessage | ErrorMessage), reply
    return reply


async def _restarted(
    tmp_path: Path, engine: LlamaCppEngine, store: Store, consumer: PeerService, seeder: PeerService
) -> PeerService:
    """The seeder stopped and started again on its data directory and database, linked again."""
    await seeder.stop()
    seeder, _ = _node(tmp_path, "s", engine, store, PATIENT)
    await seeder.start()
    await consumer.connect(f"127.0.0.1:{seeder.port}")
    await wait_for(lambda: seeder.connected(), 10, "the link again")
    return seeder


async def test_a_receipt_offered_after_the_seeder_restarted_still_settles(
    tmp_path: Path, engine: LlamaCppEngine, stores: dict[str, Store]
) -> None:
    (consumer, _), (seeder, seeder_book) = (
        _node(tmp_path, "c", engine, stores["c"], PATIENT),
        _node(tmp_path, "s", engine, stores["s"], PATIENT),
    )
    await consumer.start()
    await seeder.start()
    try:
        await consumer.connect(f"127.0.0.1:{seeder.port}")
        await wait_for(lambda: seeder.connected(), 10, "the link")
        model = engine.models()[0].name
        request, usage, hold = await _take_without_paying(consumer, seeder, model)
        assert isinstance(usage, Usage), usage
        seeder = await _restarted(tmp_path, engine, stores["s"], consumer, seeder)
        assert isinstance(await _offer(consumer, seeder, request, usage, hold), ReceiptMessage)
        assert await seeder_book.is_settled(RequestId(request.request_id))
        # Terms claiming less than the record kept are refused, after a restart as before it.
        request, usage, hold = await _take_without_paying(consumer, seeder, model)
        assert isinstance(usage, Usage)
        seeder = await _restarted(tmp_path, engine, stores["s"], consumer, seeder)
        low = usage.model_copy(update={"completion_tokens": 0})
        reply = await _offer(consumer, seeder, request, low, hold)
        assert isinstance(reply, ErrorMessage) and "do not match what was served" in reply.message
    finally:
        await consumer.stop()
        await seeder.stop()
