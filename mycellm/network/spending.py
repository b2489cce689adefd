"""This node's spend chain in one network: numbered holds before its requests leave, and their ends.

One asyncio lock orders every hold: the number and ``held_before`` a hold states follow from the
holds before it, and each is recorded in the ledger before it is sent, so a restart never hands
out a number twice. A hold ends with the request's receipt or, when nothing is owed (the seeder
refused, or the request failed before the seeder reported usage), with a signed release.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mycellm.errors import MycellmError
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.credits import unaffordable
from mycellm.ledger.spends import sign_spend
from mycellm.types import AccountId, NetworkId, PeerId, RequestId

if TYPE_CHECKING:
    from mycellm.network.credit_keeper import CreditKeeper

logger = logging.getLogger(__name__)

RECENT_ENDS = 8  # receipts and releases shown to a seeder with each hold


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold this node signed: its number, what earlier holds took, its most, and the signed bytes."""

    seq: int
    held_before: int
    max_price: int
    seeder: PeerId
    signed: bytes

    @property
    def terms(self) -> tuple[int, int, int]:
        return self.seq, self.held_before, self.max_price


@dataclass
class _Chain:
    next_seq: int
    held_total: int
    open: dict[RequestId, Hold] = field(default_factory=dict)


class SpendClerk:
    """Signs this node's holds and releases in one network, recorded in ``keeper``."""

    def __init__(self, identity: NodeIdentity, network_id: NetworkId, keeper: CreditKeeper) -> None:
        self._identity = identity
        self._network_id = network_id
        self._keeper = keeper
        self._lock = asyncio.Lock()
        self._chain: _Chain | None = None
        # The latest ends, newest first: read once, then kept here, since only this node ends
        # this account's holds (a receipt it settles, a release it signs).
        self._ends: deque[tuple[str, bytes]] | None = None
        self._ended = 0  # holds ended so far: a read that raced an end is not kept

    @property
    def _account(self) -> AccountId:
        return AccountId(self._identity.account_id)

    async def _loaded(self) -> _Chain:
        if self._chain is None:
            next_seq, held_total = await self._keeper.spend_head(self._account)
            self._chain = _Chain(next_seq, held_total)
            # Holds left open by an earlier run keep counting here until their receipt comes.
            for seq, request_id, price in await self._keeper.open_holds(self._account):
                self._chain.open[RequestId(request_id)] = Hold(seq, 0, price, PeerId(""), b"")
        return self._chain

    async def hold(self, request_id: RequestId, seeder: PeerId, price: int) -> Hold:
        """Sign and record the next hold; 402 if the balance less the open holds cannot pay ``price``
        (read and recorded in one transaction)."""
        async with self._lock:
            chain = await self._loaded()
            open_total = sum(hold.max_price for hold in chain.open.values())
            seq, held_before = chain.next_seq, chain.held_total
            signed = sign_spend(
                self._identity,
                "hold",
                network_id=self._network_id,
                request_id=request_id,
                seeder_peer_id=seeder,
                seq=seq,
                held_before=held_before,
                max_price=price,
            )
            left = await self._keeper.record_hold(signed, open_total)  # recorded before it leaves
            if left < 0:
                raise unaffordable(max(0, left + price), price)
            chain.next_seq, chain.held_total = seq + 1, held_before + price
            hold = Hold(seq, held_before, price, seeder, signed)
            chain.open[request_id] = hold
            return hold

    def settled(self, request_id: RequestId, receipt: bytes | None = None) -> None:
        """The hold of ``request_id`` ended with its receipt."""
        if self._chain is not None:
            self._chain.open.pop(request_id, None)
        self._end("receipt", receipt)

    def _end(self, kind: str, evidence: bytes | None) -> None:
        self._ended += 1
        if self._ends is not None and evidence is not None:
            self._ends.appendleft((kind, evidence))
        else:
            self._ends = None  # read again

    async def release(self, request_id: RequestId, hold: Hold) -> None:
        """End ``hold`` with nothing owed: signed, recorded, shown to the next seeders."""
        signed = sign_spend(
            self._identity,
            "release",
            network_id=self._network_id,
            request_id=request_id,
            seeder_peer_id=hold.seeder,
            seq=hold.seq,
            held_before=hold.held_before,
            max_price=hold.max_price,
        )
        try:
            await self._keeper.note_spends([signed])
        except MycellmError as error:
            logger.warning("could not record the release of %s: %s", request_id, error.message)
            return
        if self._chain is not None:
            self._chain.open.pop(request_id, None)
        self._end("release", signed)

    async def recent_ends(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """This account's latest receipts and releases, for the next seeder to see."""
        ends: Iterable[tuple[str, bytes]] | None = self._ends
        if ends is None:
            ended = self._ended
            ends = await self._keeper.recent_ends(self._account, RECENT_ENDS)
            if ended == self._ended:
                self._ends = deque(ends, maxlen=RECENT_ENDS)
        receipts = tuple(evidence for kind, evidence in ends if kind == "receipt")
        releases = tuple(evidence for kind, evidence in ends if kind == "release")
        return receipts, releases
