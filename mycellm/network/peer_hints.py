"""PeerHints: the addresses of peers never linked, as signed records peers relayed, bounded so no peer can fill it.

A hint is kept only if its record verifies (``peer_addresses``), is fresh, newer than the one held
for that peer, and its address is allowed. The table is bounded overall (``max_peer_hints``) and
per bucket: per relaying peer (``max_hints_per_source``), per address group (a /16, for IPv6 a
/32) and per account (one account can certify any number of device keys). A full bucket refuses
the newcomer; a full table makes room by evicting the oldest hint of the largest source bucket,
and only for a newcomer whose own source holds fewer, so a hostile relay can displace its own
hints and nobody else's. Hints are dialed in an order drawn at random once per node (a salted
hash), one from each source bucket before a second from any: neither grinding low peer ids nor
sending many hints buys an attacker the dialer's attention.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

from mycellm.config import NodeSettings
from mycellm.errors import IdentityError
from mycellm.identity.certificates import DeviceCertificate
from mycellm.network.messages import PeerAddress
from mycellm.network.peer_addresses import (
    ADDRESS_MAX_AGE_S,
    AddressPolicy,
    HeardAddress,
    Verdict,
    address_group,
    read_address,
)

MAX_HINT_DIALS = 3  # a hint dialed this often without a link to its peer is dropped


@dataclass(frozen=True, slots=True)
class HintLimits:
    """The bounds of the table of hints (settings of the same names)."""

    max_hints: int = 256
    per_source: int = 32
    per_group: int = 16
    per_account: int = 8

    @classmethod
    def of(cls, settings: NodeSettings) -> HintLimits:
        return cls(
            max_hints=settings.max_peer_hints,
            per_source=settings.max_hints_per_source,
            per_group=settings.max_hints_per_address_group,
            per_account=settings.max_hints_per_account,
        )


@dataclass(slots=True)
class Hint:
    """One learned address: the verified record, who relayed it, and the buckets it counts in."""

    heard: HeardAddress
    source: str
    group: str
    account_id: str
    order: int  # when it was kept: the oldest of a bucket goes first
    rank: bytes  # its place in the dialing order (a salted hash of the peer id)
    dials: int = 0

    @property
    def peer_id(self) -> str:
        return self.heard.peer_id

    @property
    def address(self) -> str:
        return self.heard.address


def verified(heard: HeardAddress, revoked: Callable[[DeviceCertificate], bool], now: float) -> Verdict:
    """The signatures and validity of a record heard, then its certificate against the revocations."""
    verdict = heard.verify(now)
    if verdict == "kept" and revoked(heard.certificate):
        return "revoked"
    return verdict


class PeerHints:
    """The table of hints; ``revoked`` says whether a certificate is revoked (the node's keeper)."""

    def __init__(
        self,
        policy: AddressPolicy,
        limits: HintLimits,
        revoked: Callable[[DeviceCertificate], bool] = lambda certificate: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self._limits = limits
        self._revoked = revoked
        self._clock = clock
        self._salt = os.urandom(16)
        self._hints: dict[str, Hint] = {}
        self._buckets: dict[str, dict[str, None]] = {}  # source -> its hints' peer ids, oldest first
        self._groups: Counter[str] = Counter()
        self._accounts: Counter[str] = Counter()
        self._order = count()

    @classmethod
    def of(cls, settings: NodeSettings, revoked: Callable[[DeviceCertificate], bool]) -> PeerHints:
        return cls(AddressPolicy.of(settings), HintLimits.of(settings), revoked)

    def __len__(self) -> int:
        return len(self._hints)

    def get(self, peer_id: str) -> Hint | None:
        return self._hints.get(peer_id)

    def hints(self) -> list[Hint]:
        return list(self._hints.values())

    def rank(self, key: str) -> bytes:
        """A place in an order drawn at random for this node, fixed while it runs."""
        return hashlib.sha256(self._salt + key.encode()).digest()

    def hear(self, entry: PeerAddress, source: str) -> Verdict:
        """Take one relayed entry: "kept", or why not ("forged" counts against the relay).

        The cheap checks (parse, time, policy, room) come before any signature is checked, so an
        entry that would be dropped anyway costs no verification.
        """
        now = self._clock()
        try:
            heard = read_address(entry)
        except IdentityError:
            return "forged"
        if not heard.fresh(now):
            return "stale"
        if not self.policy.allows(heard.address):
            return "refused"
        held = self._hints.get(heard.peer_id)
        if held is not None and held.heard.signed_at >= heard.signed_at:
            return "known"  # an older (or the same) record never replaces a newer one
        group, account_id = address_group(heard.address), heard.certificate.account_id
        source = held.source if held is not None else source
        if not self._fits(source, group, account_id, held):
            return "full"
        verdict = verified(heard, self._revoked, now)
        if verdict != "kept":
            return verdict
        if held is not None:
            self._remove(held)
        elif len(self._hints) >= self._limits.max_hints:
            victim = self._victim(source)
            if victim is None:
                return "full"
            self._remove(victim)
        order = held.order if held is not None else next(self._order)
        dials = held.dials if held is not None else 0  # a newer record does not buy more dials
        self._add(Hint(heard, source, group, account_id, order, self.rank(heard.peer_id), dials))
        return "kept"

    def _fits(self, source: str, group: str, account_id: str, held: Hint | None) -> bool:
        """Whether the buckets of a newcomer (or of ``held``'s replacement) have room for it."""
        sources = len(self._buckets.get(source, ())) - (held is not None)
        groups = self._groups[group] - (held is not None and held.group == group)
        accounts = self._accounts[account_id] - (held is not None and held.account_id == account_id)
        if sources >= self._limits.per_source or groups >= self._limits.per_group:
            return False
        if accounts >= self._limits.per_account:
            return False
        return (
            held is not None or len(self._hints) < self._limits.max_hints or self._victim(source) is not None
        )

    def _victim(self, source: str) -> Hint | None:
        """The hint a newcomer of ``source`` displaces in a full table: the oldest of the largest source
        bucket, if that bucket holds more than the newcomer's own."""
        largest = max(self._buckets, key=lambda other: len(self._buckets[other]), default=None)
        if largest is None or len(self._buckets[largest]) <= len(self._buckets.get(source, ())) + 1:
            return None
        return self._hints[next(iter(self._buckets[largest]))]

    def _add(self, hint: Hint) -> None:
        self._hints[hint.peer_id] = hint
        bucket = self._buckets.setdefault(hint.source, {})
        bucket[hint.peer_id] = None
        # Keep the bucket oldest first (a replacement keeps its place).
        if any(self._hints[peer_id].order > hint.order for peer_id in bucket):
            ordered = sorted(bucket, key=lambda peer_id: self._hints[peer_id].order)
            self._buckets[hint.source] = dict.fromkeys(ordered)
        self._groups[hint.group] += 1
        self._accounts[hint.account_id] += 1

    def _remove(self, hint: Hint) -> None:
        del self._hints[hint.peer_id]
        bucket = self._buckets[hint.source]
        del bucket[hint.peer_id]
        if not bucket:
            del self._buckets[hint.source]
        for counter, key in ((self._groups, hint.group), (self._accounts, hint.account_id)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def forget(self, peer_id: str) -> None:
        """The peer is linked now: what it says of itself on the link replaces the hint."""
        hint = self._hints.get(peer_id)
        if hint is not None:
            self._remove(hint)

    def dialed(self, address: str) -> None:
        """A dial of ``address`` is starting: each hint of it dialed too often is dropped."""
        for hint in [hint for hint in self._hints.values() if hint.address == address]:
            hint.dials += 1
            if hint.dials >= MAX_HINT_DIALS:
                self._remove(hint)

    def is_hint(self, address: str) -> bool:
        return any(hint.address == address for hint in self._hints.values())

    def pick(self, wanted: int, skip: Callable[[Hint], bool] = lambda hint: False) -> list[str]:
        """Up to ``wanted`` addresses to dial, one from each source bucket in turn (buckets and hints in
        this node's random order); expired hints are dropped first."""
        expired = self._clock() - ADDRESS_MAX_AGE_S
        for hint in [hint for hint in self._hints.values() if hint.heard.signed_at < expired]:
            self._remove(hint)
        queues = [
            sorted(
                (hint for peer_id in bucket if not skip(hint := self._hints[peer_id])), key=lambda h: h.rank
            )
            for _, bucket in sorted(self._buckets.items(), key=lambda item: self.rank(item[0]))
        ]
        picked: list[str] = []
        depth = 0
        while len(picked) < wanted and any(depth < len(queue) for queue in queues):
            for queue in queues:
                if depth < len(queue) and len(picked) < wanted and queue[depth].address not in picked:
                    picked.append(queue[depth].address)
            depth += 1
        return picked
