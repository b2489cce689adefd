"""The seeder's side of settlement: whom it serves before any work, and the receipts it countersigns.

A paid request must come with its consumer's signed hold (``mycellm/ledger/spends.py``) for this
request and this seeder. The seeder first takes in the receipts and releases shown with it, then
records the hold: a hold that contradicts what this node knows of the account's chain proves it
lies, and such an account is refused from then on. It serves when the consumer's balance, less its
parked receipts and every earlier hold not yet seen to end, covers the most the request may cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mycellm.errors import MycellmError, PaymentRequiredError, ReceiptError
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.credits import unaffordable
from mycellm.ledger.pricing import PriceTable, credits
from mycellm.ledger.receipts import Receipt, ReceiptTerms, countersign
from mycellm.ledger.served import ServedRecord
from mycellm.ledger.spends import check_spend
from mycellm.network.registry import PeerRegistry
from mycellm.types import AccountId, GenerationRequest, ModelInfo, PeerId, RequestId, Usage

if TYPE_CHECKING:
    from mycellm.network.credit_keeper import CreditKeeper, FraudListener, ReceiptListener
    from mycellm.network.messages import InferenceMessage, ReceiptOfferMessage
    from mycellm.network.quic import PeerLink

logger = logging.getLogger(__name__)

REMEMBERED_REQUESTS = 4096

HoldTerms = tuple[int, int, int]  # seq, held_before, max_price


@dataclass(frozen=True, slots=True)
class Served:
    consumer: bytes
    model: str
    tier: str | None
    usage: Usage
    hold: HoldTerms | None


class SeenReceipts:
    """Receipts this node has recorded lately, by digest: each comes again with every hold of its
    consumer and from every peer that passes it on, and is checked and written once, not each time."""

    def __init__(self, size: int = REMEMBERED_REQUESTS) -> None:
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    @staticmethod
    def _digest(encoded: bytes) -> bytes:
        return hashlib.blake2b(encoded, digest_size=16).digest()

    def __contains__(self, encoded: bytes) -> bool:
        return self._digest(encoded) in self._digests

    def add(self, encoded: bytes) -> None:
        self._digests[self._digest(encoded)] = None
        while len(self._digests) > self._size:
            self._digests.popitem(last=False)


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """An upper-leaning guess before tokenizing (3 characters a token, plus the chat template)."""
    text = request.prompt or ""
    messages = request.messages or ()
    characters = len(text) + sum(len(str(message.get("content") or "")) for message in messages)
    return characters // 3 + 8 * len(messages) + 1


class SeederSide:
    """The Settler's seeder methods (a mixin: the state is the Settler's)."""

    identity: NodeIdentity
    registry: PeerRegistry
    prices: PriceTable
    network_id: str
    _keeper: CreditKeeper
    _on_settled: ReceiptListener
    _served: OrderedDict[RequestId, Served]
    _receipts: OrderedDict[RequestId, bytes]
    _seen: SeenReceipts
    _member: Callable[[str], Coroutine[Any, Any, None]]
    admission_tokens: Callable[[GenerationRequest, ModelInfo, int], int]
    _pass_on_proofs: Callable[[PeerId | None], Coroutine[Any, Any, None]]
    _on_fraud: FraudListener
    _background: Callable[[Coroutine[Any, Any, None]], None]
    _dues: dict[RequestId, asyncio.TimerHandle]  # served requests whose receipt is awaited

    async def check_consumer(
        self, consumer: DeviceCertificate, message: InferenceMessage, model: ModelInfo
    ) -> HoldTerms | None:
        """402 unless the consumer may be served this request; its hold's terms (None: our own account)."""
        if consumer.account_id == self.identity.account_id:
            return None  # a device of our own account: free
        policy, request = self.prices.settings, message.request
        record = self.registry.reputation_of(consumer.peer_id)
        if record is not None and record.freeloading(policy.grace_credits, policy.max_consume_ratio):
            raise PaymentRequiredError(
                f"refused: this peer consumed {record.consumed_credits:.4f} credits from this node and served it "
                f"{record.served_us_credits:.4f}; serve more than 1/{policy.max_consume_ratio:g} of what you consume",
                code="consumer_refused",
            )
        await self._member(consumer.account_id)  # the link serving this network proved its membership
        account = AccountId(consumer.account_id)
        hold = self._checked_hold(consumer, message)
        releases = await self._take_in_ends(account, message)
        prompt = estimate_prompt_tokens(request)
        price = self.prices.price(
            model.name, model.tier, prompt, self.admission_tokens(request, model, prompt)
        )
        # Kept before any work, in the same transaction: a restart still knows what it owes.
        served = ServedRecord(
            request.request_id,
            consumer.peer_id,
            consumer.to_bytes(),
            model.name,
            model.tier,
            request.max_tokens,
            hold,
        )
        check = await self._keeper.check_hold(account, [*releases, message.hold], price, served)  # type: ignore[list-item]
        for proof in check.proofs:
            self._on_fraud(proof, None)
        if check.frauds or check.view.fraud is not None:
            raise PaymentRequiredError(
                f"refused: this account's spends are proven to contradict themselves ({check.view.fraud or 'this hold'})",
                code="consumer_fraud",
            )
        if hold[2] < price:
            raise PaymentRequiredError(
                f"the hold covers {credits(hold[2]):.6f} credits; this request may cost {credits(price):.6f}",
                code="hold_short",
            )
        if not check.admitted:
            raise unaffordable(max(0, check.available), price)
        return hold

    def _checked_hold(self, consumer: DeviceCertificate, message: InferenceMessage) -> HoldTerms:
        if message.hold is None:
            raise PaymentRequiredError(
                "a paid request must carry its consumer's signed hold", code="hold_required"
            )
        try:
            spend, statement, certificate = check_spend(message.hold)
        except ReceiptError as error:
            raise PaymentRequiredError(
                f"the hold is invalid: {error.message}", code="hold_invalid"
            ) from error
        problems = {
            "is not a hold": statement.kind != "hold",
            "is signed by another device than this link's": certificate.to_bytes() != consumer.to_bytes(),
            "names another network": statement.network_id != self.network_id,
            "names another request": statement.request_id != message.request.request_id,
            "names another seeder": statement.seeder_peer_id != self.identity.peer_id,
        }
        wrong = [problem for problem, found in problems.items() if found]
        if wrong:
            raise PaymentRequiredError(f"the hold {wrong[0]}", code="hold_invalid")
        return spend.seq, spend.held_before, spend.max_price

    async def _take_in_ends(self, account: AccountId, message: InferenceMessage) -> list[bytes]:
        """Record the receipts shown with a hold (the consumer's own, checked as any); the releases
        shown that are this account's, to be noted with the hold."""
        for encoded in message.receipts:
            if encoded in self._seen:
                continue
            try:
                await self._keeper.record_receipt(Receipt.from_bytes(encoded), observed=True)
            except MycellmError:
                continue  # a bad one only makes the hold's chain look less paid
            self._seen.add(encoded)
        releases = []
        for encoded in message.releases:
            try:
                spend = check_spend(encoded)[0]
            except ReceiptError:
                continue
            if (
                spend.kind == "release"
                and spend.account_id == account
                and spend.network_id == self.network_id
            ):
                releases.append(encoded)
        return releases

    def served(
        self, link: PeerLink, request_id: RequestId, model: ModelInfo, usage: Usage, hold: HoldTerms | None
    ) -> None:
        """The request finished: its usage (the billed part) is kept, and its receipt is due."""
        if hold is None:
            return
        billed = usage.billed
        consumer = link.certificate.to_bytes()
        self._served[request_id] = Served(consumer, model.name, model.tier, billed, hold)
        while len(self._served) > REMEMBERED_REQUESTS:
            self._served.popitem(last=False)
        record = ServedRecord(
            request_id,
            link.peer_id,
            consumer,
            model.name,
            model.tier,
            None,
            hold,
            (billed.prompt_tokens, billed.completion_tokens),
        )
        self._background(self._keeper.remember_served(record))
        price = self.prices.price(model.name, model.tier, billed.prompt_tokens, billed.completion_tokens)
        deadline = self.prices.settings.receipt_deadline_s
        self._dues[request_id] = asyncio.get_running_loop().call_later(
            deadline, self._overdue, request_id, link.peer_id, price
        )
        while len(self._dues) > REMEMBERED_REQUESTS:
            self._dues.pop(next(iter(self._dues))).cancel()

    def _overdue(self, request_id: RequestId, peer_id: PeerId, price: int) -> None:
        """No receipt in time: a missed receipt, and the work counts as consumed unpaid."""
        if self._dues.pop(request_id, None) is not None:
            logger.warning("no receipt from %s for %s in time", peer_id[:12], request_id)
            self.registry.unpaid_work(peer_id, credits(price))

    async def _what_was_served(self, link: PeerLink, terms: ReceiptTerms) -> Served:
        """What this node served for these terms, as it remembers or as its database kept it."""
        request_id = RequestId(terms.request_id)
        served = self._served.get(request_id)
        if served is None:
            record = await self._keeper.served_record(request_id)
            if record is not None and record.usage is None:
                # It broke off (this node died, or the consumer resumed it elsewhere): the consumer
                # pays for what it received, within what the request allowed.
                bound = record.max_tokens if record.max_tokens is not None else terms.completion_tokens
                tokens = min(terms.completion_tokens, bound)
                served = Served(
                    record.consumer,
                    record.model,
                    record.tier,
                    Usage(prompt_tokens=terms.prompt_tokens, completion_tokens=tokens),
                    record.hold,
                )
            elif record is not None:
                usage = Usage(prompt_tokens=record.usage[0], completion_tokens=record.usage[1])  # type: ignore[index]
                served = Served(record.consumer, record.model, record.tier, usage, record.hold)
        if (
            served is None
            or served.consumer != link.certificate.to_bytes()
            or terms.consumer != served.consumer
        ):
            raise ReceiptError(
                f"this node served no request {terms.request_id} to this peer", code="receipt_unjustified"
            )
        return served

    async def countersign_offer(self, link: PeerLink, offer: ReceiptOfferMessage) -> Receipt:
        """Check the consumer's terms against what this node served it, countersign and record."""
        terms = ReceiptTerms.from_bytes(offer.terms)
        request_id = RequestId(terms.request_id)
        settled = self._receipts.get(request_id) or await self._keeper.receipt(request_id)
        if settled is not None:  # a retry of a receipt already settled here
            receipt = Receipt.from_bytes(settled)
            if receipt.terms == offer.terms and receipt.consumer_signature == offer.consumer_signature:
                return receipt
        served = await self._what_was_served(link, terms)
        claimed = (terms.model, terms.tier, terms.prompt_tokens, terms.completion_tokens)
        actual = (served.model, served.tier, served.usage.prompt_tokens, served.usage.completion_tokens)
        if claimed != actual:
            raise ReceiptError(
                f"terms {claimed} do not match what was served {actual}", code="receipt_unjustified"
            )
        stated = (terms.spend_seq, terms.held_before, terms.hold_price)
        if served.hold is not None and stated != served.hold:
            raise ReceiptError(
                f"terms state the spend {stated}, not the hold {served.hold} this request came with",
                code="receipt_unjustified",
            )
        receipt = countersign(offer.terms, offer.consumer_signature, self.identity)
        await self._member(self.identity.account_id)
        await self._keeper.record_receipt(receipt)
        await self._pass_on_proofs(None)
        if (due := self._dues.pop(request_id, None)) is not None:
            due.cancel()
        self.registry.earned(link.peer_id, credits(terms.price))
        self._on_settled(receipt.to_bytes(), link.peer_id)
        self._served.pop(request_id, None)
        self._receipts[request_id] = receipt.to_bytes()
        self._seen.add(receipt.to_bytes())
        while len(self._receipts) > REMEMBERED_REQUESTS:
            self._receipts.popitem(last=False)
        return receipt
