"""Spend chains: each account's spends in a network form one numbered, signed sequence.

Before a peer serves it, a consumer signs a *hold* for the request: its account's next sequence
number ``seq``, ``held_before`` (the sum of the ``max_price`` of every earlier hold of the account
in this network) and the most this request may cost. The receipt of the request repeats the three
values (the consumer signs its terms); a hold that ends without a receipt (the seeder refused, or
nothing was produced) is closed by a signed *release*. Each of these is a statement by the consumer
that anyone can check with its device certificate alone, and any two of them that contradict each
other are a proof of fraud: two requests under one number, a ``held_before`` that skips what the
previous hold took, or a request both paid and released. A seeder counts every hold of the account
it has not seen end as still outstanding, so a consumer that keeps its chain honest cannot spend
its balance twice at once; one that lies is caught as soon as its statements meet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict, Field

from mycellm.errors import IdentityError, ReceiptError
from mycellm.identity.canonical import CanonicalModel
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.receipts import (
    CertificateBytes,
    Receipt,
    ReceiptTerms,
    Signature,
    check_signatures,
    party_certificate,
    verify_party,
)

SPEND_VERSION = 1
SPEND_MAX_BYTES = 4096
MAX_SEQ = 2**62

Kind = Literal["hold", "release", "receipt"]


class SpendStatement(CanonicalModel):
    """A hold or a release, as its consumer signs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = SPEND_VERSION
    kind: Literal["hold", "release"]
    network_id: str = Field(min_length=1, max_length=128)
    request_id: str = Field(min_length=1, max_length=128)
    seeder_peer_id: str = Field(min_length=1, max_length=128)
    consumer: CertificateBytes
    seq: int = Field(ge=1, lt=MAX_SEQ)
    held_before: int = Field(ge=0, lt=MAX_SEQ)
    max_price: int = Field(ge=0, lt=MAX_SEQ)
    signed_at_ms: int = Field(ge=0)

    @classmethod
    def from_bytes(cls, data: bytes) -> SpendStatement:
        try:
            return cls.parse_canonical(
                data, what="spend statement", max_bytes=SPEND_MAX_BYTES, version=SPEND_VERSION
            )
        except IdentityError as error:
            raise ReceiptError(error.message, code="spend_invalid") from error


class SignedSpend(CanonicalModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = SPEND_VERSION
    statement: bytes = Field(min_length=1, max_length=SPEND_MAX_BYTES)
    signature: Signature

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedSpend:
        try:
            return cls.parse_canonical(
                data, what="signed spend", max_bytes=2 * SPEND_MAX_BYTES, version=SPEND_VERSION
            )
        except IdentityError as error:
            raise ReceiptError(error.message, code="spend_invalid") from error


@dataclass(frozen=True, slots=True)
class Spend:
    """One checked statement of a spend chain: a hold, a release, or a receipt's terms."""

    kind: Kind
    network_id: str
    account_id: str
    seq: int
    request_id: str
    held_before: int
    max_price: int
    evidence: bytes  # the SignedSpend or the Receipt, as signed: a third party checks it alone

    def contradicts(self, other: Spend) -> str | None:
        """Why this statement and ``other`` of the same chain cannot both be honest, or None."""
        if (self.network_id, self.account_id) != (other.network_id, other.account_id):
            return None
        if self.seq == other.seq:
            if self.request_id != other.request_id:
                return f"two requests under spend number {self.seq}"
            if (self.held_before, self.max_price) != (other.held_before, other.max_price):
                return f"two different holds under spend number {self.seq}"
            if {self.kind, other.kind} == {"release", "receipt"}:
                return f"request {self.request_id} both paid and released"
            return None
        first, second = (self, other) if self.seq < other.seq else (other, self)
        if second.seq == first.seq + 1 and second.held_before != first.held_before + first.max_price:
            return f"spend number {second.seq} skips what number {first.seq} held"
        return None


def sign_spend(
    identity: NodeIdentity,
    kind: Literal["hold", "release"],
    *,
    network_id: str,
    request_id: str,
    seeder_peer_id: str,
    seq: int,
    held_before: int,
    max_price: int,
) -> bytes:
    """The consumer's signed hold or release (canonical CBOR of a SignedSpend)."""
    statement = SpendStatement(
        kind=kind,
        network_id=network_id,
        request_id=request_id,
        seeder_peer_id=seeder_peer_id,
        consumer=identity.certificate.to_bytes(),
        seq=seq,
        held_before=held_before,
        max_price=max_price,
        signed_at_ms=int(time.time() * 1000),
    ).to_bytes()
    return SignedSpend(statement=statement, signature=identity.sign(statement)).to_bytes()


def check_spend(data: bytes) -> tuple[Spend, SpendStatement, DeviceCertificate]:
    """A signed hold or release, verified against its consumer's device certificate."""
    signed = SignedSpend.from_bytes(data)
    statement = SpendStatement.from_bytes(signed.statement)
    certificate = party_certificate(statement.consumer, "consumer", statement.signed_at_ms)
    verify_party(certificate, signed.signature, signed.statement, "consumer")
    spend = Spend(
        kind=statement.kind,
        network_id=statement.network_id,
        account_id=certificate.account_id,
        seq=statement.seq,
        request_id=statement.request_id,
        held_before=statement.held_before,
        max_price=statement.max_price,
        evidence=data,
    )
    return spend, statement, certificate


def receipt_spend(terms: ReceiptTerms, consumer: DeviceCertificate, receipt: bytes) -> Spend | None:
    """The spend a checked receipt states, if its terms carry one."""
    if terms.spend_seq is None or terms.held_before is None or terms.hold_price is None:
        return None
    return Spend(
        kind="receipt",
        network_id=terms.network_id,
        account_id=consumer.account_id,
        seq=terms.spend_seq,
        request_id=terms.request_id,
        held_before=terms.held_before,
        max_price=terms.hold_price,
        evidence=receipt,
    )


def evidence_spend(kind: Kind, evidence: bytes) -> Spend:
    """A stored statement checked again from its evidence alone (a fraud proof's two halves)."""
    if kind != "receipt":
        return check_spend(evidence)[0]
    terms, consumer, _ = check_signatures(Receipt.from_bytes(evidence))
    spend = receipt_spend(terms, consumer, evidence)
    if spend is None:
        raise ReceiptError("this receipt states no spend", code="spend_invalid")
    return spend


def proves_fraud(first: tuple[Kind, bytes], second: tuple[Kind, bytes]) -> str | None:
    """Check a fraud proof from its two signed statements alone: the contradiction, or None."""
    return evidence_spend(*first).contradicts(evidence_spend(*second))
