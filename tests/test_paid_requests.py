"""Paid requests between three nodes over real QUIC, each node with its own ledger (SQLite or PostgreSQL):
402 before work, receipts on both sides, refused receipts, and conservation under hundreds of requests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mycellm.config import ModelSettings, PriceSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import PaymentRequiredError
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable
from mycellm.ledger.receipts import Receipt, ReceiptTerms, draft_terms, sign_as_consumer
from mycellm.ledger.store import Store
from mycellm.network.messages import (
    ChunkMessage,
    DoneMessage,
    ErrorMessage,
    InferenceMessage,
    PingMessage,
    ReceiptOfferMessage,
    ReceiptsMessage,
)
from mycellm.network.service import PeerService
from mycellm.types import GenerationRequest, NetworkId, Usage
from tests.peer_kit import peer_service, shared_network, wait_for

pytestmark = pytest.mark.timeout(300)

# Cheap enough that hundreds of requests fit in the grant, dear enough that 402 is reachable.
CREDITS = PriceSettings(tier_prices={"tiny": 1.0}, initial_grant=5.0)
NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def ledger_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield [f"sqlite+aiosqlite:///{tmp_path / f'ledger-{name}.db'}" for name in "abc"]
        return
    server = request.getfixturevalue("postgres_server")
    names = [server.create_database() for _ in range(3)]
    yield [server.url(name) for name in names]
    for name in names:
        server.drop_database(name)


@dataclass
class PaidNode:
    service: PeerService
    store: Store
    book: CreditBook


@pytest.fixture
async def trio(
    tmp_path: Path, engine: LlamaCppEngine, ledger_urls: list[str]
) -> AsyncIterator[list[PaidNode]]:
    nodes: list[PaidNode] = []
    prices = PriceTable(CREDITS)
    for name, url in zip("abc", ledger_urls, strict=True):
        store = await Store.open(url)
        book = CreditBook(store.engine, prices, NetworkId(shared_network(tmp_path, CREDITS).network_id))
        service = peer_service(
            tmp_path,
            f"node-{name}",
            [engine],
            book,  # in this process the CreditBook itself is the CreditKeeper
            credits=CREDITS,
            heartbeat_interval_s=2.0,  # hundreds of requests share two cores with the heartbeats
        )
        await service.start()
        nodes.append(PaidNode(service, store, book))
    for first, second in ((1, 0), (2, 0), (1, 2)):
        await nodes[first].service.connect(f"127.0.0.1:{nodes[second].service.port}")
    await wait_for(lambda: all(len(node.service.connected()) == 2 for node in nodes), 10, "a full mesh")
    yield nodes
    for node in nodes:
        await node.service.stop()
        await node.store.close()


async def _unpaid(
    consumer: PeerService, seeder: PeerService, request: GenerationRequest
) -> tuple[Usage, tuple[int, int, int]]:
    """``request`` sent with a hold signed by the consumer's Settler but never paid on its own:
    its usage and the hold's terms, for the test to offer terms by hand."""
    assert consumer.settler is not None
    request = request.model_copy(update={"network_id": consumer.settler.network_id})
    model = next(info for info in consumer.session(seeder.peer_id).hello.models if info.name == request.model)
    admission = await consumer.settler.admit(request, model, seeder.peer_id)
    stream = consumer.session(seeder.peer_id).link.open_stream()
    stream.send(InferenceMessage(request=admission.request, hold=admission.hold.signed))
    while True:
        message = await stream.receive(60)
        if isinstance(message, DoneMessage):
            return message.usage, admission.hold.terms
        assert isinstance(message, ChunkMessage), message


def _request(model: str, max_tokens: int | None = 2) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"paid-{next(NUMBERS)}",
        model=model,
        messages=({"role": "user", "content": "Say yes."},),
        max_tokens=max_tokens,
        temperature=0,
    )


async def test_a_paid_request_is_settled_on_both_sides(trio: list[PaidNode], engine: LlamaCppEngine) -> None:
    a, b, _ = trio
    model = engine.models()[0].name
    request = _request(model, max_tokens=4)
    result = await a.service.complete(b.service.peer_id, request)
    for node in (a, b):
        await wait_for(lambda node=node: node.book.is_settled(request.request_id), 10, "the receipt")  # type: ignore[misc]
    price = PriceTable(CREDITS).price(
        model, "tiny", result.usage.prompt_tokens, result.usage.completion_tokens
    )
    grant = 5 * MICRO
    for node in (a, b):
        balances = await node.book.balances()
        assert balances[a.service.identity.account_id] == grant - price
        assert balances[b.service.identity.account_id] == grant + price
        assert (await audit(node.store.engine, node.book.prices, node.book.network_id)).ok


async def test_a_consumer_that_cannot_pay_gets_402_before_any_work(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    a, b, _ = trio
    model = engine.models()[0].name
    with pytest.raises(PaymentRequiredError, match="does not cover the price") as refused:
        await a.service.complete(b.service.peer_id, _request(model, max_tokens=20_000))
    assert refused.value.status == 402
    # Nothing moved on B: its own account and its linked peers' hold their grants, no receipt.
    assert b.service.serving == 0 and set((await b.book.balances()).values()) <= {5 * MICRO}
    # An open max_tokens is capped at what the balance pays for.
    settler = a.service.settler
    assert settler is not None
    capped = await settler.admit(_request(model, None), engine.models()[0], b.service.peer_id)
    assert capped.request.max_tokens is not None and 0 < capped.request.max_tokens < 5000


async def test_offers_for_what_was_not_served_are_refused(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    a, b, _ = trio
    model = engine.models()[0]
    link = a.service.session(b.service.peer_id).link
    terms = draft_terms(
        PriceTable(CREDITS),
        request_id="never-served",
        network_id=a.book.network_id,
        model=model.name,
        tier=model.tier,
        prompt_tokens=5,
        completion_tokens=5,
        consumer=a.service.identity.certificate,
        seeder=b.service.identity.certificate,
        started_at_ms=0,
    )
    encoded, signature = sign_as_consumer(terms, a.service.identity)
    stream = link.open_stream()
    stream.send(ReceiptOfferMessage(terms=encoded, consumer_signature=signature))
    answer = await stream.receive(10)
    assert isinstance(answer, ErrorMessage) and answer.code == "receipt_refused"
    assert "served no request never-served" in answer.message
    # A served request whose terms claim fewer tokens than were served.
    request = _request(model.name, max_tokens=3)
    usage, hold = await _unpaid(a.service, b.service, request)  # the test offers the terms itself
    low = ReceiptTerms.model_validate(
        terms.model_dump()
        | {
            "request_id": request.request_id,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": 0,
            "spend_seq": hold[0],
            "held_before": hold[1],
            "hold_price": hold[2],
        }
    )
    encoded, signature = sign_as_consumer(low, a.service.identity)
    stream = link.open_stream()
    stream.send(ReceiptOfferMessage(terms=encoded, consumer_signature=signature))
    answer = await stream.receive(10)
    assert isinstance(answer, ErrorMessage) and "do not match what was served" in answer.message
    assert not await b.book.is_settled(request.request_id)
    assert set((await b.book.balances()).values()) == {5 * MICRO}  # nothing moved


async def test_hundreds_of_concurrent_paid_requests_conserve_credits(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    model = engine.models()[0].name
    pairs = [(trio[i % 3], trio[(i + 1 + i // 3 % 2) % 3]) for i in range(240)]
    requests = [_request(model, max_tokens=1) for _ in pairs]
    outcomes = await asyncio.gather(
        *(
            consumer.service.complete(seeder.service.peer_id, request)
            for (consumer, seeder), request in zip(pairs, requests, strict=True)
        ),
        return_exceptions=True,
    )
    served = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(isinstance(error, PaymentRequiredError) for error in refused), refused[:3]
    assert len(served) >= 100
    for node in trio:
        await node.service.settler.drain()  # type: ignore[union-attr]

    # Receipts travel the network: every node ends with every receipt and the same balances.
    async def everywhere() -> bool:
        return all([await node.book.is_settled(request_id) for node in trio for request_id in settled_ids])

    settled_ids = [
        request.request_id
        for request, outcome in zip(requests, outcomes, strict=True)
        if not isinstance(outcome, BaseException)
    ]
    await wait_for(everywhere, 30, "every receipt on every node")
    books = []
    for node in trio:
        report = await audit(node.store.engine, node.book.prices, node.book.network_id)
        assert report.ok, report.problems[:5]
        assert report.receipts == len(served)
        assert sum((await node.book.balances()).values()) == report.issued == 3 * 5 * MICRO
        books.append(await node.book.balances())
    assert books[0] == books[1] == books[2]
    assert all(isinstance(outcome.usage, Usage) for outcome in served)


async def test_a_peer_that_only_consumes_is_refused_until_it_serves(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    a, b, _ = trio
    model = engine.models()[0].name
    assert b.service.settler is not None and a.service.settler is not None
    # B's policy: a grace of almost nothing, and no more consumed than served.
    b.service.settler.prices = PriceTable(
        CREDITS.model_copy(update={"grace_credits": 0.00001, "max_consume_ratio": 1.0})
    )
    await a.service.complete(b.service.peer_id, _request(model))
    await a.service.settler.drain()
    record = b.service.registry.reputation_of(a.service.peer_id)
    assert (
        record is not None and record.consumed_credits > 0 and record.receipts_honoured == pytest.approx(1.0)
    )
    with pytest.raises(PaymentRequiredError, match="this peer consumed") as refused:
        await a.service.complete(b.service.peer_id, _request(model))
    assert refused.value.status == 402
    # A serves B more than it consumed: B serves A again.
    for _ in range(3):
        await b.service.complete(a.service.peer_id, _request(model, max_tokens=2))
    await b.service.settler.drain()
    await a.service.complete(b.service.peer_id, _request(model))
    seen_by_a = a.service.registry.reputation_of(b.service.peer_id)
    assert (
        seen_by_a is not None
        and seen_by_a.reputation == pytest.approx(1.0)
        and seen_by_a.served_us_credits > 0
    )


async def test_a_receipt_lost_in_a_crash_is_settled_on_retry(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    a, b, _ = trio
    assert a.service.settler is not None and b.service.settler is not None
    model = engine.models()[0]
    settler = a.service.settler
    request = _request(model.name, max_tokens=3)
    usage, hold = await _unpaid(a.service, b.service, request)  # its payment is done by hand below
    link = a.service.session(b.service.peer_id).link
    terms = draft_terms(
        PriceTable(CREDITS),
        request_id=request.request_id,
        network_id=a.book.network_id,
        model=model.name,
        tier=model.tier,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        consumer=a.service.identity.certificate,
        seeder=b.service.identity.certificate,
        started_at_ms=0,
        hold=hold,
    )
    encoded, signature = sign_as_consumer(terms, a.service.identity)
    await a.book.remember_offer(request.request_id, b.service.peer_id, encoded, signature)
    await settler._exchange(link, encoded, signature)  # B countersigns and settles; A "crashes" here
    assert await b.book.is_settled(request.request_id) and not await a.book.is_settled(request.request_id)
    assert len(await a.book.pending_offers(b.service.peer_id)) == 1
    b.service.settler._receipts.clear()  # B restarted too: only its database remembers
    b.service.settler._served.clear()
    settler.retry_pending(link)  # what a new link to B does
    await settler.drain()
    assert await a.book.is_settled(request.request_id)
    assert await a.book.receipt(request.request_id) == await b.book.receipt(request.request_id)
    assert await a.book.pending_offers(b.service.peer_id) == []
    for node in (a, b):
        assert (await audit(node.store.engine, node.book.prices, node.book.network_id)).ok


async def test_receipts_heard_from_the_network_are_checked_like_any_other(
    trio: list[PaidNode], engine: LlamaCppEngine
) -> None:
    a, b, c = trio
    model = engine.models()[0].name
    request = _request(model, max_tokens=2)
    await a.service.complete(b.service.peer_id, request)
    await wait_for(lambda: c.book.is_settled(request.request_id), 10, "C hearing of the receipt")
    before = await c.book.balances()
    genuine = Receipt.from_bytes(await c.book.receipt(request.request_id) or b"")
    terms = ReceiptTerms.from_bytes(genuine.terms).model_copy(update={"request_id": "forged-1", "price": 1})
    forged = genuine.model_copy(update={"terms": terms.to_bytes()})
    session = a.service.session(c.service.peer_id)
    session.send(ReceiptsMessage(receipts=(forged.to_bytes(), b"garbage")))
    session.send(PingMessage(seq=10**6, sent_at=0.0))
    await asyncio.sleep(0.5)
    assert not await c.book.is_settled("forged-1") and await c.book.balances() == before
    assert (await audit(c.store.engine, c.book.prices, c.book.network_id)).ok
