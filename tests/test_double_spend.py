"""A consumer cannot spend its balance twice by asking several seeders at once.

Every paid request carries a hold signed by its consumer: the account's next spend number, what
its earlier holds took (``held_before``) and the most this request may cost. Three real nodes over
QUIC, one real model. A consumer that keeps its chain honest is refused by the second seeder before
any work; one that lies (two requests under one number, or a ``held_before`` that skips a hold) is
served once by each seeder it deceives, and then proven a fraud by any node that holds both
statements, and refused by every node from then on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mycellm.config import ModelSettings, PriceSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import PaymentRequiredError, ReceiptError
from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.ledger.audit import audit
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable
from mycellm.ledger.receipts import Receipt, draft_terms, sign_as_consumer
from mycellm.ledger.spends import proves_fraud, sign_spend
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
from mycellm.types import AccountId, GenerationRequest, NetworkId, Usage
from tests.peer_kit import peer_service, shared_network, wait_for

# One credit a completion token (a quarter for the prompt), sixty to start: the hold of one
# request of 40 tokens fits a balance, two do not.
CREDITS = PriceSettings(tier_prices={"tiny": 1000.0}, initial_grant=60.0, grace_credits=1000.0)
MAX_TOKENS = 40
PRICES = PriceTable(CREDITS)
NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


@dataclass
class Node:
    service: PeerService
    store: Store
    book: CreditBook


@pytest.fixture
async def trio(tmp_path: Path, engine: LlamaCppEngine) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    network_id = NetworkId(shared_network(tmp_path, CREDITS).network_id)
    for name in "abc":
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / f'ledger-{name}.db'}")
        book = CreditBook(store.engine, PRICES, network_id)
        service = peer_service(
            tmp_path, f"node-{name}", [engine], book, credits=CREDITS, heartbeat_interval_s=2.0
        )
        await service.start()
        nodes.append(Node(service, store, book))
    for first, second in ((1, 0), (2, 0), (1, 2)):
        await nodes[first].service.connect(f"127.0.0.1:{nodes[second].service.port}")
    await wait_for(lambda: all(len(node.service.connected()) == 2 for node in nodes), 10, "a full mesh")
    yield nodes
    for node in nodes:
        await node.service.stop()
        await node.store.close()


class Hostile:
    """The consumer's keys in the hands of someone who signs holds and receipts as they please."""

    def __init__(self, node: Node, model: str) -> None:
        self.node, self.model = node, model
        self.identity: NodeIdentity = node.service.identity
        self.network_id = node.book.network_id

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"spend-{next(NUMBERS)}",
            model=self.model,
            messages=({"role": "user", "content": "Say yes."},),
            max_tokens=MAX_TOKENS,
            temperature=0,
            network_id=self.network_id,
        )

    def price(self) -> int:
        from mycellm.network.seeding import estimate_prompt_tokens

        return PRICES.price(self.model, "tiny", estimate_prompt_tokens(self.request()), MAX_TOKENS)

    def hold(self, request: GenerationRequest, seeder: Node, seq: int, held_before: int) -> bytes:
        return sign_spend(
            self.identity,
            "hold",
            network_id=self.network_id,
            request_id=request.request_id,
            seeder_peer_id=seeder.service.peer_id,
            seq=seq,
            held_before=held_before,
            max_price=self.price(),
        )

    async def ask(self, seeder: Node, request: GenerationRequest, hold: bytes) -> Usage | ErrorMessage:
        stream = self.node.service.session(seeder.service.peer_id).link.open_stream()
        stream.send(InferenceMessage(request=request, hold=hold))
        while True:
            message = await stream.receive(60)
            if isinstance(message, DoneMessage):
                return message.usage
            if isinstance(message, ErrorMessage):
                return message
            assert isinstance(message, ChunkMessage), message

    async def pay(
        self, seeder: Node, request: GenerationRequest, usage: Usage, hold: tuple[int, int, int]
    ) -> Receipt | ErrorMessage:
        terms = draft_terms(
            PRICES,
            request_id=request.request_id,
            network_id=self.network_id,
            model=self.model,
            tier="tiny",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            consumer=self.identity.certificate,
            seeder=seeder.service.identity.certificate,
            started_at_ms=0,
            hold=hold,
        )
        encoded, signature = sign_as_consumer(terms, self.identity)
        stream = self.node.service.session(seeder.service.peer_id).link.open_stream()
        stream.send(ReceiptOfferMessage(terms=encoded, consumer_signature=signature))
        reply = await stream.receive(10)
        if isinstance(reply, ErrorMessage):
            return reply
        assert isinstance(reply, ReceiptMessage), reply
        receipt = Receipt.from_bytes(reply.receipt)
        await self.node.book.record_receipt(receipt)
        return receipt


async def _head(node: Node, account: str) -> tuple[int, int]:
    return await node.book.spend_head(AccountId(account))


async def test_an_honest_chain_cannot_be_spent_twice_at_once(
    trio: list[Node], engine: LlamaCppEngine
) -> None:
    a, b, c = trio
    mallory = Hostile(a, engine.models()[0].name)
    price = mallory.price()
    assert price <= 60 * MICRO < 2 * price  # one request fits the grant, two do not
    seq, held = await _head(a, mallory.identity.account_id)
    first, second = mallory.request(), mallory.request()
    # The chain is honest: the second hold states what the first one took.
    outcomes = await asyncio.gather(
        mallory.ask(b, first, mallory.hold(first, b, seq, held)),
        mallory.ask(c, second, mallory.hold(second, c, seq + 1, held + price)),
    )
    assert isinstance(outcomes[0], Usage), outcomes[0]
    refused = outcomes[1]
    assert isinstance(refused, ErrorMessage) and refused.code == "insufficient_credits", refused
    assert "does not cover" in refused.message
    assert c.service.serving == 0 and c.service.settler is not None and not c.service.settler._served
    # No one holds a proof against an honest chain.
    for node in trio:
        assert await node.book.fraud_proof(AccountId(mallory.identity.account_id)) is None


async def test_the_consumers_own_node_never_holds_more_than_its_balance(
    trio: list[Node], engine: LlamaCppEngine
) -> None:
    a, b, c = trio
    model = engine.models()[0].name
    network_id = a.book.network_id
    requests = [
        GenerationRequest(
            request_id=f"own-{next(NUMBERS)}",
            model=model,
            messages=({"role": "user", "content": "Say yes."},),
            max_tokens=MAX_TOKENS,
            temperature=0,
            network_id=network_id,
        )
        for _ in range(2)
    ]
    outcomes = await asyncio.gather(
        a.service.complete(b.service.peer_id, requests[0]),
        a.service.complete(c.service.peer_id, requests[1]),
        return_exceptions=True,
    )
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], PaymentRequiredError), outcomes
    # Refused by its own node before it left: no seeder heard of it.
    assert not refused[0].message.startswith("peer "), refused[0].message
    for seeder in (b, c):
        assert seeder.service.settler is not None
        assert len(seeder.service.settler._served) + len(seeder.service.settler._receipts) <= 1


async def test_two_requests_under_one_number_prove_fraud_and_every_node_refuses_the_account(
    trio: list[Node], engine: LlamaCppEngine
) -> None:
    a, b, c = trio
    mallory = Hostile(a, engine.models()[0].name)
    account = AccountId(mallory.identity.account_id)
    seq, held = await _head(a, account)
    first, second = mallory.request(), mallory.request()
    # The same number to two seeders: neither can know of the other's hold, so both serve...
    outcomes = await asyncio.gather(
        mallory.ask(b, first, mallory.hold(first, b, seq, held)),
        mallory.ask(c, second, mallory.hold(second, c, seq, held)),
    )
    assert all(isinstance(outcome, Usage) for outcome in outcomes), outcomes
    hold = (seq, held, mallory.price())
    # ...but only one can be paid: the balance covers one answer, and the first receipt settles it.
    assert isinstance(outcomes[0], Usage) and isinstance(outcomes[1], Usage)
    assert isinstance(await mallory.pay(b, first, outcomes[0], hold), Receipt)
    unpaid = await mallory.pay(c, second, outcomes[1], hold)
    assert isinstance(unpaid, ErrorMessage) and unpaid.code == "insufficient_credits", unpaid
    # C held the hold that B's receipt contradicts: it proves the fraud and tells the network.

    async def proven_everywhere() -> bool:
        return all([await node.book.fraud_proof(account) is not None for node in trio])

    await wait_for(proven_everywhere, 10, "a fraud proof on every node")
    proof = await b.book.fraud_proof(account)
    assert proof is not None
    reason, one, other = proof
    assert "two requests under spend number" in reason
    # The proof stands alone: a third party checks it from the two signed statements.
    assert proves_fraud(one, other) is not None
    # Every node refuses the account before any work, whatever hold it brings.
    for seeder in (b, c):
        request = mallory.request()
        next_seq, next_held = await _head(seeder, account)
        refused = await mallory.ask(seeder, request, mallory.hold(request, seeder, next_seq, next_held))
        assert isinstance(refused, ErrorMessage) and "proven to contradict" in refused.message, refused
    # Credits are still conserved everywhere: the second receipt is parked where it overdraws.
    for node in trio:
        report = await audit(node.store.engine, node.book.prices, node.book.network_id)
        assert report.ok, report.problems[:5]
        balances = await node.book.balances()
        assert all(balance >= 0 for balance in balances.values())
        assert sum(balances.values()) == report.issued


async def test_a_hold_that_skips_what_the_last_one_took_is_proven_a_lie(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    try:
        book = CreditBook(store.engine, PRICES, NetworkId("net-1"))
        consumer = load_or_create_identity(tmp_path / "consumer", node_name="consumer")
        account = AccountId(consumer.account_id)

        def statement(kind: str, seq: int, held_before: int, request_id: str, price: int = 100) -> bytes:
            return sign_spend(
                consumer,
                kind,  # type: ignore[arg-type]
                network_id="net-1",
                request_id=request_id,
                seeder_peer_id="seeder",
                seq=seq,
                held_before=held_before,
                max_price=price,
            )

        honest = [
            statement("hold", 1, 0, "r1"),
            statement("hold", 2, 100, "r2"),
            statement("release", 1, 0, "r1"),
        ]
        assert await book.note_spends(honest) == []
        assert await book.spend_head(account) == (3, 200)
        view = await book.spend_view(account, 3, 200)
        assert view.outstanding == 100 and view.fraud is None  # r2 has not ended
        # Number 3 claims the chain held 100 before it: 100 short of what 1 and 2 took.
        assert await book.note_spends([statement("hold", 3, 100, "r3")]) == [account]
        proof = await book.fraud_proof(account)
        assert proof is not None and "skips" in proof[0]
        assert proves_fraud(proof[1], proof[2]) is not None
        # Paid and released is a lie too; a release is checked like a hold.
        other = load_or_create_identity(tmp_path / "other", node_name="other")
        with pytest.raises(ReceiptError):
            await book.note_spends([statement("hold", 1, 0, "r1")[:-1] + b"\x00"])
        assert await book.fraud_proof(AccountId(other.account_id)) is None
        # Two honest statements are no proof.
        assert proves_fraud(("hold", honest[0]), ("hold", honest[1])) is None
    finally:
        await store.close()


def test_receipts_seen_lately_are_remembered_by_digest_and_bounded() -> None:
    """A receipt comes with every hold of its consumer and from every peer: checked once, within a bound."""
    from mycellm.network.seeding import SeenReceipts

    seen = SeenReceipts(size=3)
    for index in range(5):
        seen.add(b"receipt %d" % index)
    assert b"receipt 4" in seen and b"receipt 2" in seen
    assert b"receipt 1" not in seen and b"receipt 0" not in seen  # the oldest went
    assert b"receipt 4 " not in seen
