"""Paying for requests between peers: admission before any work, and the receipt exchange after it.

The consumer (the node whose client asked) checks its balance before forwarding, pricing a request
at its ``max_tokens`` or, when it names none, at the most it may generate (the model's context, at
most ``admission_max_tokens``), which becomes its ``max_tokens``. The seeder checks the consumer's
balance as its own ledger knows it before serving, at the same price. After the answer the consumer
signs the terms, the seeder checks them against what it served, countersigns and records the
receipt; the consumer records it too.

An account is granted its initial credits only as a proven member: this node's own account, and
the account of a link the membership gate admitted in this network (``retry_pending`` is called
for each network a new link serves; a request or receipt offer reaches the settler only over a
link that serves its network). Accounts seen only in receipts heard from the network get nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from mycellm.config import Tier
from mycellm.errors import MycellmError, PeerError, ReceiptError
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.pricing import PriceTable, credits
from mycellm.ledger.receipts import Receipt, ReceiptTerms, draft_terms, sign_as_consumer
from mycellm.ledger.spend_book import Proof
from mycellm.network.credit_keeper import CreditKeeper, FraudListener, ReceiptListener
from mycellm.network.messages import ErrorMessage, ReceiptMessage, ReceiptOfferMessage, error_from_message
from mycellm.network.peer_log import PEER_LOG
from mycellm.network.registry import PeerRegistry
from mycellm.network.seeding import (
    REMEMBERED_REQUESTS,
    SeederSide,
    SeenReceipts,
    Served,
    estimate_prompt_tokens,
)
from mycellm.network.spending import Hold, SpendClerk
from mycellm.types import AccountId, GenerationRequest, ModelInfo, NetworkId, PeerId, RequestId, Usage

if TYPE_CHECKING:
    from mycellm.network.quic import PeerLink


logger = logging.getLogger(__name__)


RECEIPT_TIMEOUT_S = 10.0


PAY_ATTEMPTS = 3


UNLISTED_TIER = "tiny"
TIER_ORDER: tuple[str, ...] = get_args(Tier)  # best first


@dataclass(frozen=True, slots=True)
class NetworkTerms:
    """How one network prices and pays: its tier for each model (a peer's claim counts for nothing),
    and its settler (None on a node that keeps no credits)."""

    network_id: NetworkId
    model_tiers: Mapping[str, str]
    settler: Settler | None

    def priced(self, model: ModelInfo) -> ModelInfo:
        """``model`` with the network's tier for it; a model the network lists no tier for is ranked
        and priced at the lowest tier, whatever its server claims. A server may rank its own copy
        lower than the network does (a coarser quantization, a slow machine), never higher."""
        tier = self.model_tiers.get(model.name, UNLISTED_TIER)
        if model.tier in TIER_ORDER and TIER_ORDER.index(model.tier) > TIER_ORDER.index(tier):
            tier = model.tier
        return model if model.tier == tier else model.model_copy(update={"tier": tier})


@dataclass(frozen=True, slots=True)
class Admission:
    """A request this node may send: bounded, with its signed hold and the chain's recent ends."""

    request: GenerationRequest
    hold: Hold
    receipts: tuple[bytes, ...]
    releases: tuple[bytes, ...]


class Settler(SeederSide):
    """Admits and pays for this node's requests to peers, and gets paid for the requests it serves.

    ``keeper`` is the node's ledger; ``registry`` counts receipts honoured and missed per peer;
    ``on_settled`` hears of every receipt settled here, and ``on_fraud`` of every fraud proof found
    or heard here, so they can be passed on to the network.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        prices: PriceTable,
        network_id: NetworkId,
        keeper: CreditKeeper,
        registry: PeerRegistry | None = None,
        on_settled: ReceiptListener | None = None,
        on_fraud: FraudListener | None = None,
    ) -> None:
        self.identity = identity
        self.registry = registry or PeerRegistry()
        self.prices = prices
        self.network_id = network_id
        self._keeper = keeper
        self._on_settled: ReceiptListener = on_settled or (lambda receipt, source: None)
        self._on_fraud: FraudListener = on_fraud or (lambda proof, source: None)
        self._served: OrderedDict[RequestId, Served] = OrderedDict()
        self._dues: dict[RequestId, asyncio.TimerHandle] = {}
        self._clerk = SpendClerk(identity, network_id, keeper)
        self._receipts: OrderedDict[RequestId, bytes] = OrderedDict()
        self._seen = SeenReceipts()
        self._payments: set[asyncio.Task[None]] = set()
        self._members: set[str] = set()  # accounts joined in these books already (no grant twice anyway)
        self._join_own_account()

    def _join_own_account(self) -> None:
        """This node holds the network: its own account is a member (granted in the background)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet: the first admission or settlement joins it
            return
        task = loop.create_task(self._join_own())
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    async def _join_own(self) -> None:
        await self._member(self.identity.account_id)

    async def _member(self, account_id: str) -> None:
        """Join a proven member once in these books (the ledger grants once in any case)."""
        if account_id in self._members:
            return
        try:
            await self._keeper.join(AccountId(account_id))
        except MycellmError as error:
            logger.warning("could not open the account %s: %s", account_id[:12], error.message)
            return
        if len(self._members) >= REMEMBERED_REQUESTS:
            self._members.clear()
        self._members.add(account_id)

    @property
    def keeper(self) -> CreditKeeper:
        return self._keeper

    def reprice(self, prices: PriceTable, keeper: CreditKeeper | None = None) -> None:
        """A newer description's prices, and the books reopened at them (None: the same books)."""
        self.prices = prices
        if keeper is not None:
            self._keeper = keeper
            self._clerk = SpendClerk(self.identity, NetworkId(self.network_id), keeper)
            self._members.clear()
            self._join_own_account()

    # -- consumer -------------------------------------------------------------------------------

    async def admit(self, request: GenerationRequest, model: ModelInfo, seeder: PeerId) -> Admission:
        """402 before any work if this node cannot pay the most this request may cost, less what
        its open holds may still take; else the request (bounded) with its signed hold.

        An open max_tokens is priced, and bounded, at what the model may generate for it."""
        await self._member(self.identity.account_id)
        prompt = estimate_prompt_tokens(request)
        tokens = self.admission_tokens(request, model, prompt)
        price = self.prices.price(model.name, model.tier, prompt, tokens)
        receipts, releases = await self._clerk.recent_ends()
        hold = await self._clerk.hold(RequestId(request.request_id), seeder, price)
        bounded = (
            request if request.max_tokens is not None else request.model_copy(update={"max_tokens": tokens})
        )
        return Admission(bounded, hold, receipts, releases)

    def release_later(self, request_id: RequestId, hold: Hold) -> None:
        """End a hold with nothing owed, in the background (the request failed before any usage)."""
        self._background(self._clerk.release(request_id, hold))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    def admission_tokens(self, request: GenerationRequest, model: ModelInfo, prompt: int) -> int:
        """The completion tokens a request is priced at: its max_tokens, else the room the model's
        context leaves after the prompt, at most the configured cap."""
        if request.max_tokens is not None:
            return request.max_tokens
        cap = self.prices.settings.admission_max_tokens
        return max(1, min(cap, (model.context_tokens or cap) - prompt))

    def pay_later(
        self,
        link: PeerLink,
        request_id: RequestId,
        model: ModelInfo,
        usage: Usage,
        started_ms: int,
        hold: Hold,
    ) -> None:
        """Settle in the background: the client has its answer already."""
        self._background(self.pay(link, request_id, model, usage, started_ms, hold))

    async def pay(
        self,
        link: PeerLink,
        request_id: RequestId,
        model: ModelInfo,
        usage: Usage,
        started_ms: int,
        hold: Hold | None = None,
    ) -> None:
        usage = usage.billed  # a resumed answer's continuation was prompt to this seeder
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
            hold=None if hold is None else hold.terms,
        )
        encoded, signature = sign_as_consumer(terms, self.identity)
        # Kept before it leaves: a crash before the receipt comes back retries it after restart.
        await self._keeper.remember_offer(request_id, link.peer_id, encoded, signature)
        await self._deliver(link, terms, encoded, signature, hold)

    def retry_pending(self, link: PeerLink) -> None:
        """Offer again, in the background, every receipt ``link``'s peer still owes this node."""
        self._background(self._retry(link))

    async def _retry(self, link: PeerLink) -> None:
        # A new link admitted in this network: the gate checked its membership, so it is a member.
        await self._member(link.certificate.account_id)
        for request_id, encoded, signature in await self._keeper.pending_offers(link.peer_id):
            logger.info("offering the receipt of %s to %s again", request_id, link.peer_id[:12])
            await self._deliver(link, ReceiptTerms.from_bytes(encoded), encoded, signature)

    async def _deliver(
        self, link: PeerLink, terms: ReceiptTerms, encoded: bytes, signature: bytes, hold: Hold | None = None
    ) -> None:
        request_id = RequestId(terms.request_id)
        for attempt in range(PAY_ATTEMPTS):
            try:
                receipt = await self._exchange(link, encoded, signature)
                await self._member(link.certificate.account_id)  # the seeder of a link in this network
                await self._keeper.record_receipt(receipt)
                await self._pass_on_proofs(None)
                self._seen.add(receipt.to_bytes())
                self._clerk.settled(request_id, receipt.to_bytes())
                self.registry.paid(link.peer_id, credits(terms.price), terms.completion_tokens)
                self._on_settled(receipt.to_bytes(), link.peer_id)
                return
            except ReceiptError as error:  # refused on either side: retrying cannot help
                logger.warning("receipt %s refused: %s", request_id, error.message)
                await self._keeper.forget_offer(request_id)
                self.registry.unpaid(link.peer_id)
                if hold is not None:  # refused: nothing is owed under this hold
                    await self._clerk.release(request_id, hold)
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

    def observe(self, receipts: tuple[bytes, ...], source: PeerId) -> None:
        """Record receipts a peer passed on, and pass on those new to this node."""
        self._background(self._observe(receipts, source))

    async def _observe(self, receipts: tuple[bytes, ...], source: PeerId) -> None:
        for encoded in receipts:
            if encoded in self._seen:
                continue
            try:
                if await self._keeper.record_receipt(Receipt.from_bytes(encoded), observed=True):
                    self._on_settled(encoded, source)
                self._seen.add(encoded)
            except MycellmError as error:
                PEER_LOG.warning(
                    logger, source, "a receipt from %s was refused: %s", source[:12], error.message
                )
        await self._pass_on_proofs(None)

    def observe_fraud(self, proof: Proof, source: PeerId) -> None:
        """Keep a fraud proof a peer passed on, and pass it on if it is new and checks out."""
        self._background(self._observe_fraud(proof, source))

    async def _observe_fraud(self, proof: Proof, source: PeerId) -> None:
        try:
            if await self._keeper.record_fraud(proof):
                self._on_fraud(proof, source)
        except MycellmError as error:
            PEER_LOG.warning(
                logger, source, "a fraud proof from %s was refused: %s", source[:12], error.message
            )

    async def _pass_on_proofs(self, source: PeerId | None) -> None:
        """Pass on the fraud proofs this node's books found since the last look."""
        try:
            for proof in await self._keeper.take_proofs():
                self._on_fraud(proof, source)
        except MycellmError as error:
            logger.warning("could not read the fraud proofs: %s", error.message)

    async def drain(self) -> None:
        if self._payments:
            await asyncio.gather(*self._payments, return_exceptions=True)
