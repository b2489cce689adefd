"""Receipts: the terms of one served request, signed by the consumer and countersigned by the seeder.

The consumer signs the canonical CBOR of the terms; the seeder signs the terms followed by the
consumer's signature. Each party is named by its device certificate, so anyone can check that
the signing key is that party's device key and that an account key certified it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from mycellm.errors import IdentityError, ReceiptError
from mycellm.identity.canonical import CanonicalModel
from mycellm.identity.certificates import CERTIFICATE_MAX_BYTES, DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.pricing import PriceTable

RECEIPT_VERSION = 1
RECEIPT_MAX_BYTES = 32768
MAX_RELAYS = 8
RECEIPT_FUTURE_S = 600  # a receipt may finish at most this far ahead of this node's clock
HEARD_RECEIPT_AGE_S = 7 * 86400  # a receipt heard from the network may be at most this old

CertificateBytes = Annotated[bytes, Field(min_length=1, max_length=CERTIFICATE_MAX_BYTES)]
Signature = Annotated[bytes, Field(min_length=64, max_length=64)]


class RelayShare(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    certificate: CertificateBytes
    fee: int = Field(ge=0)


class ReceiptTerms(CanonicalModel):
    """What was served, to whom, by whom, for how much (micro-credits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = RECEIPT_VERSION
    request_id: str = Field(min_length=1, max_length=128)
    network_id: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=256)
    tier: str | None = Field(default=None, max_length=32)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    price: int = Field(ge=0)
    seeder_share: int = Field(ge=0)
    consumer: CertificateBytes
    seeder: CertificateBytes
    relays: tuple[RelayShare, ...] = Field(default=(), max_length=MAX_RELAYS)
    started_at_ms: int = Field(ge=0)
    finished_at_ms: int = Field(ge=0)
    # The consumer's spend chain (``spends.py``): the number, held_before and max of its hold.
    spend_seq: int | None = Field(default=None, ge=1, lt=2**62)
    held_before: int | None = Field(default=None, ge=0, lt=2**62)
    hold_price: int | None = Field(default=None, ge=0, lt=2**62)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReceiptTerms:
        try:
            return cls.parse_canonical(
                data,
                what="receipt terms",
                max_bytes=RECEIPT_MAX_BYTES,
                version=RECEIPT_VERSION,
                tuples=("relays",),
            )
        except IdentityError as error:
            raise ReceiptError(error.message) from error


class Receipt(CanonicalModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = RECEIPT_VERSION
    terms: bytes = Field(min_length=1, max_length=RECEIPT_MAX_BYTES)
    consumer_signature: Signature
    seeder_signature: Signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        try:
            return cls.parse_canonical(
                data, what="receipt", max_bytes=RECEIPT_MAX_BYTES, version=RECEIPT_VERSION
            )
        except IdentityError as error:
            raise ReceiptError(error.message) from error


@dataclass(frozen=True, slots=True)
class CheckedReceipt:
    """A receipt whose signatures, parties and amounts all hold."""

    receipt: Receipt
    terms: ReceiptTerms
    consumer: DeviceCertificate
    seeder: DeviceCertificate
    relays: tuple[tuple[DeviceCertificate, int], ...]

    @property
    def request_id(self) -> str:
        return self.terms.request_id

    def deltas(self) -> dict[str, int]:
        """Balance change per account id; they sum to zero."""
        changes: dict[str, int] = {}
        for account, amount in (
            (self.consumer.account_id, -self.terms.price),
            (self.seeder.account_id, self.terms.seeder_share),
            *((relay.account_id, fee) for relay, fee in self.relays),
        ):
            changes[account] = changes.get(account, 0) + amount
        return changes


def draft_terms(
    prices: PriceTable,
    *,
    request_id: str,
    network_id: str,
    model: str,
    tier: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    consumer: DeviceCertificate,
    seeder: DeviceCertificate,
    relays: tuple[DeviceCertificate, ...] = (),
    started_at_ms: int,
    finished_at_ms: int | None = None,
    hold: tuple[int, int, int] | None = None,
) -> ReceiptTerms:
    """The terms both parties will sign, priced by the table; ``hold`` is the consumer's (seq,
    held_before, max_price) for this request."""
    price = prices.price(model, tier, prompt_tokens, completion_tokens)
    seeder_share, fees = prices.split(price, len(relays))
    return ReceiptTerms(
        request_id=request_id,
        network_id=network_id,
        model=model,
        tier=tier,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        price=price,
        seeder_share=seeder_share,
        consumer=consumer.to_bytes(),
        seeder=seeder.to_bytes(),
        relays=tuple(
            RelayShare(certificate=relay.to_bytes(), fee=fee) for relay, fee in zip(relays, fees, strict=True)
        ),
        started_at_ms=started_at_ms,
        finished_at_ms=int(time.time() * 1000) if finished_at_ms is None else finished_at_ms,
        **({} if hold is None else {"spend_seq": hold[0], "held_before": hold[1], "hold_price": hold[2]}),
    )


def sign_as_consumer(terms: ReceiptTerms, identity: NodeIdentity) -> tuple[bytes, bytes]:
    """The encoded terms and the consumer's signature over them."""
    if terms.consumer != identity.certificate.to_bytes():
        raise ReceiptError("these terms name another consumer than this node")
    encoded = terms.to_bytes()
    return encoded, identity.sign(encoded)


def countersign(terms: bytes, consumer_signature: bytes, identity: NodeIdentity) -> Receipt:
    """The seeder's signature over the terms and the consumer's signature: the finished receipt."""
    parsed = ReceiptTerms.from_bytes(terms)
    if parsed.seeder != identity.certificate.to_bytes():
        raise ReceiptError("these terms name another seeder than this node")
    verify_party(_certificate(parsed.consumer, "consumer", parsed), consumer_signature, terms, "consumer")
    return Receipt(
        terms=terms,
        consumer_signature=consumer_signature,
        seeder_signature=identity.sign(terms + consumer_signature),
    )


@functools.lru_cache(maxsize=4096)
def _signed_certificate(data: bytes) -> DeviceCertificate:
    # The same few parties sign most receipts: their account signatures are checked once.
    certificate = DeviceCertificate.from_bytes(data)
    certificate.verify_signature()
    return certificate


def _certificate(data: bytes, party: str, terms: ReceiptTerms) -> DeviceCertificate:
    return party_certificate(data, party, terms.finished_at_ms)


def party_certificate(data: bytes, party: str, at_ms: int) -> DeviceCertificate:
    """A party's device certificate, signed by its account and valid at ``at_ms``."""
    try:
        certificate = _signed_certificate(data)
        # Valid when the request was served; a later expiry does not undo a settled receipt.
        certificate.verify(now=at_ms / 1000, signature_checked=True)
    except IdentityError as error:
        raise ReceiptError(
            f"{party} certificate: {error.message}", code="receipt_certificate_invalid"
        ) from error
    return certificate


def verify_party(certificate: DeviceCertificate, signature: bytes, payload: bytes, party: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(certificate.device_public_key).verify(signature, payload)
    except (InvalidSignature, ValueError) as error:
        raise ReceiptError(
            f"the {party} signature is not by the {party}'s device key", code="receipt_forged"
        ) from error


def check_time(terms: ReceiptTerms, *, heard: bool, now: float | None = None) -> None:
    """ReceiptError if ``terms`` finish too far from ``now``: ahead of it, or long ago for a heard one."""
    now = time.time() if now is None else now
    finished = terms.finished_at_ms / 1000
    if finished > now + RECEIPT_FUTURE_S:
        raise ReceiptError(
            f"receipt {terms.request_id} finishes {finished - now:.0f} s in the future", code="receipt_future"
        )
    if heard and finished < now - HEARD_RECEIPT_AGE_S:
        raise ReceiptError(
            f"receipt {terms.request_id} finished {(now - finished) / 86400:.1f} days ago, too long to be heard now",
            code="receipt_stale",
        )


def check_signatures(receipt: Receipt) -> tuple[ReceiptTerms, DeviceCertificate, DeviceCertificate]:
    """The terms, consumer and seeder of a receipt whose two signatures and certificates hold."""
    terms = ReceiptTerms.from_bytes(receipt.terms)
    consumer = _certificate(terms.consumer, "consumer", terms)
    seeder = _certificate(terms.seeder, "seeder", terms)
    verify_party(consumer, receipt.consumer_signature, receipt.terms, "consumer")
    verify_party(seeder, receipt.seeder_signature, receipt.terms + receipt.consumer_signature, "seeder")
    return terms, consumer, seeder


def check_receipt(receipt: Receipt, prices: PriceTable) -> CheckedReceipt:
    """Verify both signatures, every party's certificate and the amounts; ReceiptError says which failed."""
    terms, consumer, seeder = check_signatures(receipt)
    if consumer.account_id == seeder.account_id:
        raise ReceiptError("an account does not pay itself: requests served by the node itself are free")
    if terms.finished_at_ms < terms.started_at_ms:
        raise ReceiptError("the receipt finishes before it starts")
    relays = tuple((_certificate(share.certificate, "relay", terms), share.fee) for share in terms.relays)
    price = prices.price(terms.model, terms.tier, terms.prompt_tokens, terms.completion_tokens)
    seeder_share, fees = prices.split(price, len(relays))
    if (terms.price, terms.seeder_share, [share.fee for share in terms.relays]) != (
        price,
        seeder_share,
        fees,
    ):
        raise ReceiptError(
            f"amounts do not match the price table: price {terms.price} (table {price}), seeder "
            f"{terms.seeder_share} (table {seeder_share}), relay fees {[s.fee for s in terms.relays]} (table {fees})",
            code="receipt_mispriced",
        )
    return CheckedReceipt(receipt=receipt, terms=terms, consumer=consumer, seeder=seeder, relays=relays)
