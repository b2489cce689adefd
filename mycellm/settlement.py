"""Paying for requests between peers: admission before any work, and the receipt exchange after it.

The consumer (the node whose client asked) checks its balance before forwarding and caps an open
``max_tokens`` at what it can pay. The seeder checks the consumer's balance as its own ledger
knows it before serving. After the answer the consumer signs the terms, the seeder checks them
against what it served, countersigns and records the receipt; the consumer records it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mycellm.engines.base import GenerationRequest, ModelInfo, Usage
from mycellm.errors import MycellmError, PaymentRequiredError, PeerError, ReceiptError
from mycellm.identity import DeviceCertificate, NodeIdentity
from mycellm.ledger.credits import CreditBook
from mycellm.ledger.pricing import MICRO, PriceTable, credits
from mycellm.ledger.receipts import Receipt, ReceiptTerms, countersign, draft_terms, sign_as_consumer
from mycellm.peer_registry import PeerRegistry
from mycellm.wire import ErrorMessage, ReceiptMessage, ReceiptOfferMessage, error_from_message

if TYPE_CHECKING:
    from mycellm.transport.quic import PeerLink

logger = logging.getLogger(__name__)

RECEIPT_TIMEOUT_S = 10.0
PAY_ATTEMPTS = 3
REMEMBERED_REQUESTS = 4096


class CreditKeeper(Protocol):
    """The node's ledger, as settlement needs it."""

    async def balance(self, account_id: str) -> int: ...

    async def join(self, account_id: str) -> int: ...

    async def settle(self, receipt: Receipt, observed: bool = False) -> bool: ...  # False: already settled

    async def remember_offer(self, request_id: str, peer_id: str, terms: bytes, signature: bytes) -> None: ...

    async def pending_offers(self, peer_id: str) -> list[tuple[str, bytes, bytes]]: ...

    async def forget_offer(self, request_id: str) -> None: ...

    async def receipt(self, request_id: str) -> bytes | None: ...


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """An upper-leaning guess before tokenizing (3 characters a token, plus the chat template)."""
    text = request.prompt or ""
    messages = request.messages or ()
    characters = len(text) + sum(len(str(message.get("content") or "")) for message in messages)
    return characters // 3 + 8 * len(messages) + 1


@dataclass(frozen=True, slots=True)
class _Served:
    consumer: bytes
    model: str
    tier: str | None
    usage: Usage


class Settler:
    def __init__(
        self,
        identity: NodeIdentity,
        prices: PriceTable,
        network_id: str,
        keeper: CreditKeeper,
        registry: PeerRegistry | None = None,
    ) -> None:
        self.identity = identity
        self.registry = registry or PeerRegistry()
        self.prices = prices
        self.network_id = network_id
        self.keeper = keeper
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._receipts: OrderedDict[str, bytes] = OrderedDict()
        self._payments: set[asyncio.Task[None]] = set()
        # Set by the PeerService: pass a settled receipt on to the peers (but not to ``source``).
        self.publish: Callable[[bytes, str | None], None] = lambda receipt, source: None

    # -- consumer -------------------------------------------------------------------------------

    async def admit(self, request: GenerationRequest, model: ModelInfo) -> GenerationRequest:
        """402 before any work if this node cannot pay; an open max_tokens is capped at what it can."""
        balance = await self.keeper.balance(self.identity.account_id)
        prompt = estimate_prompt_tokens(request)
        if request.max_tokens is not None:
            price = self.prices.price(model.name, model.tier, prompt, request.max_tokens)
            if price > balance:
                raise _unaffordable(balance, price)
            return request
        per_token = self.prices.rate(model.name, model.tier) * MICRO / 1000
        affordable = (
            int(balance / per_token - self.prices.settings.prompt_weight * prompt) if per_token else 1 << 20
        )
        if affordable < 1:
            raise _unaffordable(balance, self.prices.price(model.name, model.tier, prompt, 1))
        room = (model.context_tokens or 4096) - prompt
        return request.model_copy(update={"max_tokens": max(1, min(affordable, room))})

    def pay_later(
        self, link: PeerLink, request_id: str, model: ModelInfo, usage: Usage, started_ms: int
    ) -> None:
        """Settle in the background: the client has its answer already."""
        task = asyncio.get_running_loop().create_task(self.pay(link, request_id, model, usage, started_ms))
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    async def pay(
        self, link: PeerLink, request_id: str, model: ModelInfo, usage: Usage, started_ms: int
    ) -> None:
        terms = draft_terms(
            self.prices,
            request_id=request_id,
            network_id=self.network_id,
            model=model.name,
            tier=model.tier,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            consumer=self.identity.certificate,
            seeder=link.certificate,
            started_at_ms=started_ms,
        )
        encoded, signature = sign_as_consumer(terms, self.identity)
        # Kept before it leaves: a crash before the receipt comes back retries it after restart.
        await self.keeper.remember_offer(request_id, link.peer_id, encoded, signature)
        await self._deliver(link, terms, encoded, signature)

    def retry_pending(self, link: PeerLink) -> None:
        """Offer again, in the background, every receipt ``link``'s peer still owes this node."""
        task = asyncio.get_running_loop().create_task(self._retry(link))
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    async def _retry(self, link: PeerLink) -> None:
        for request_id, encoded, signature in await self.keeper.pending_offers(link.peer_id):
            logger.info("offering the receipt of %s to %s again", request_id, link.peer_id[:12])
            await self._deliver(link, ReceiptTerms.from_bytes(encoded), encoded, signature)

    async def _deliver(self, link: PeerLink, terms: ReceiptTerms, encoded: bytes, signature: bytes) -> None:
        request_id = terms.request_id
        for attempt in range(PAY_ATTEMPTS):
            try:
                receipt = await self._exchange(link, encoded, signature)
                await self.keeper.settle(receipt)
                self.registry.paid(link.peer_id, credits(terms.price), terms.completion_tokens)
                self.publish(receipt.to_bytes(), link.peer_id)
                return
            except ReceiptError as error:  # refused on either side: retrying cannot help
                logger.warning("receipt %s refused: %s", request_id, error.message)
                await self.keeper.forget_offer(request_id)
                self.registry.unpaid(link.peer_id)
                return
            except MycellmError as error:
                logger.warning("receipt %s not settled (try %d): %s", request_id, attempt + 1, error.message)
                if link.closed:
                    return  # still pending: offered again when the peer is back
                await asyncio.sleep(0.5 * 2**attempt)

    async def _exchange(self, link: PeerLink, terms: bytes, signature: bytes) -> Receipt:
        stream = link.open_stream()
        try:
            stream.send(ReceiptOfferMessage(terms=terms, consumer_signature=signature))
            reply = await stream.receive(RECEIPT_TIMEOUT_S)
        finally:
            stream.end()
        if isinstance(reply, ErrorMessage):
            raise error_from_message(reply, link.peer_id)
        if not isinstance(reply, ReceiptMessage):
            raise PeerError(f"peer {link.peer_id[:12]} answered a receipt offer with {reply!r}")
        receipt = Receipt.from_bytes(reply.receipt)
        if receipt.terms != terms or receipt.consumer_signature != signature:
            raise ReceiptError("the countersigned receipt is not the one this node signed")
        return receipt

    def observe(self, receipts: tuple[bytes, ...], source: str) -> None:
        """Record receipts a peer passed on, and pass on those new to this node."""
        task = asyncio.get_running_loop().create_task(self._observe(receipts, source))
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    async def _observe(self, receipts: tuple[bytes, ...], source: str) -> None:
        for encoded in receipts:
            try:
                if await self.keeper.settle(Receipt.from_bytes(encoded), observed=True):
                    self.publish(encoded, source)
            except MycellmError as error:
                logger.warning("a receipt from %s was refused: %s", source[:12], error.message)

    async def drain(self) -> None:
        if self._payments:
            await asyncio.gather(*self._payments, return_exceptions=True)

    # -- seeder ---------------------------------------------------------------------------------

    async def check_consumer(
        self, consumer: DeviceCertificate, request: GenerationRequest, model: ModelInfo
    ) -> None:
        """402 if the consumer cannot pay for this request, as this node's ledger knows it."""
        if consumer.account_id == self.identity.account_id:
            return  # a device of our own account: free
        policy = self.prices.settings
        record = self.registry.reputation_of(consumer.peer_id)
        if record is not None and record.freeloading(policy.grace_credits, policy.max_consume_ratio):
            raise PaymentRequiredError(
                f"refused: this peer consumed {record.consumed_credits:.4f} credits from this node and served it "
                f"{record.served_us_credits:.4f}; serve more than 1/{policy.max_consume_ratio:g} of what you consume",
                code="consumer_refused",
            )
        balance = await self.keeper.join(consumer.account_id)
        tokens = request.max_tokens or 1
        price = self.prices.price(model.name, model.tier, estimate_prompt_tokens(request), tokens)
        if price > balance:
            raise _unaffordable(balance, price)

    def served(self, request_id: str, consumer: DeviceCertificate, model: ModelInfo, usage: Usage) -> None:
        if consumer.account_id == self.identity.account_id:
            return
        self._served[request_id] = _Served(consumer.to_bytes(), model.name, model.tier, usage)
        while len(self._served) > REMEMBERED_REQUESTS:
            self._served.popitem(last=False)

    async def countersign_offer(self, link: PeerLink, offer: ReceiptOfferMessage) -> Receipt:
        """Check the consumer's terms against what this node served it, countersign and record."""
        terms = ReceiptTerms.from_bytes(offer.terms)
        settled = self._receipts.get(terms.request_id) or await self.keeper.receipt(terms.request_id)
        if settled is not None:  # a retry of a receipt already settled here
            receipt = Receipt.from_bytes(settled)
            if receipt.terms == offer.terms and receipt.consumer_signature == offer.consumer_signature:
                return receipt
        served = self._served.get(terms.request_id)
        if (
            served is None
            or served.consumer != link.certificate.to_bytes()
            or terms.consumer != served.consumer
        ):
            raise ReceiptError(
                f"this node served no request {terms.request_id} to this peer", code="receipt_unjustified"
            )
        claimed = (terms.model, terms.tier, terms.prompt_tokens, terms.completion_tokens)
        actual = (served.model, served.tier, served.usage.prompt_tokens, served.usage.completion_tokens)
        if claimed != actual:
            raise ReceiptError(
                f"terms {claimed} do not match what was served {actual}", code="receipt_unjustified"
            )
        receipt = countersign(offer.terms, offer.consumer_signature, self.identity)
        await self.keeper.settle(receipt)
        self.registry.earned(link.peer_id, credits(terms.price))
        self.publish(receipt.to_bytes(), link.peer_id)
        self._served.pop(terms.request_id, None)
        self._receipts[terms.request_id] = receipt.to_bytes()
        while len(self._receipts) > REMEMBERED_REQUESTS:
            self._receipts.popitem(last=False)
        return receipt


def _unaffordable(balance: int, price: int) -> PaymentRequiredError:
    return PaymentRequiredError(
        f"balance {credits(balance):.6f} credits does not cover the price {credits(price):.6f} credits",
        param="balance",
    )


class BookKeeper:
    """A CreditKeeper over a CreditBook in this process."""

    def __init__(self, book: CreditBook) -> None:
        self._book = book

    async def balance(self, account_id: str) -> int:
        return await self._book.balance(account_id)

    async def join(self, account_id: str) -> int:
        return await self._book.join(account_id)

    async def remember_offer(self, request_id: str, peer_id: str, terms: bytes, signature: bytes) -> None:
        await self._book.remember_offer(request_id, peer_id, terms, signature)

    async def pending_offers(self, peer_id: str) -> list[tuple[str, bytes, bytes]]:
        return await self._book.pending_offers(peer_id)

    async def forget_offer(self, request_id: str) -> None:
        await self._book.forget_offer(request_id)

    async def receipt(self, request_id: str) -> bytes | None:
        return await self._book.receipt(request_id)

    async def settle(self, receipt: Receipt, observed: bool = False) -> bool:
        try:
            await self._book.settle(receipt, observed=observed)
        except ReceiptError as error:
            if error.code == "receipt_replayed":
                return False
            raise
        return True
