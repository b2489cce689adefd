"""PeerRegistry: what a node knows of every peer (capabilities, load, latency, outcomes), kept on disk."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mycellm.types import ModelInfo

logger = logging.getLogger(__name__)


PeerState = Literal["alive", "dead", "unknown"]


RTT_SMOOTHING = 0.3


MAX_RECORDS = 1024


REGISTRY_MAX_BYTES = 16 << 20


class PeerRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peer_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    account_id: str | None = None
    node_name: str | None = None
    address: str | None = None
    software_version: str | None = None
    models: tuple[ModelInfo, ...] = ()
    load: int = Field(default=0, ge=0)
    rtt_ms: float | None = None
    # Reputation: counters that decay by half every half-life (as of ``decayed_at``).
    successes: float = Field(default=0.0, ge=0)
    failures: float = Field(default=0.0, ge=0)
    latency_ms: float | None = None  # time to first token of requests it served us, smoothed
    tokens_served: float = Field(default=0.0, ge=0)  # tokens it generated for us
    served_us_credits: float = Field(default=0.0, ge=0)  # what we paid it
    consumed_credits: float = Field(default=0.0, ge=0)  # what it paid us
    receipts_honoured: float = Field(default=0.0, ge=0)
    receipts_missed: float = Field(default=0.0, ge=0)
    decayed_at: float = 0.0
    first_seen: float = 0.0
    last_seen: float | None = None
    state: PeerState = "unknown"

    @property
    def success_rate(self) -> float:
        total = self.successes + self.failures
        return 1.0 if total == 0 else self.successes / total

    @property
    def reputation(self) -> float:
        """0..1: requests answered times receipts honoured (both decayed; 1 for a newcomer)."""
        honoured = (self.receipts_honoured + 1) / (self.receipts_honoured + self.receipts_missed + 1)
        return self.success_rate * honoured

    def freeloading(self, grace_credits: float, max_ratio: float) -> bool:
        """Consumed past the grace and far more than it served us."""
        return (
            self.consumed_credits > grace_credits
            and self.consumed_credits > max_ratio * self.served_us_credits
        )


DECAYING = (
    "successes",
    "failures",
    "tokens_served",
    "served_us_credits",
    "consumed_credits",
    "receipts_honoured",
    "receipts_missed",
)


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    peers: list[PeerRecord]


class PeerRegistry:
    """In memory, saved to ``path`` as JSON (atomically) when the owner calls ``save``.

    Only peers this node was linked to get a record (the address is the one their link gave);
    addresses other peers relay are hints, kept apart and bounded (``peer_hints``).
    """

    def __init__(self, path: Path | None = None, half_life_s: float = 7 * 86400) -> None:
        self._path = path
        self._half_life_s = half_life_s
        self._records: dict[str, PeerRecord] = {}
        self.dirty = False
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            if not path.exists():
                return
            if path.stat().st_size > REGISTRY_MAX_BYTES:
                raise ValueError(f"over {REGISTRY_MAX_BYTES} bytes")
            stored = _RegistryFile.model_validate_json(path.read_bytes())
        except (OSError, ValueError, ValidationError) as error:
            # A registry is a cache of what peers said; a bad one is set aside, not fatal.
            logger.warning("ignoring unreadable peer registry %s: %s", path, error)
            return
        for record in stored.peers[:MAX_RECORDS]:
            # Nothing is known to be alive after a restart until a link says so again.
            self._records[record.peer_id] = record.model_copy(update={"state": "unknown"})

    def save(self) -> None:
        if self._path is None or not self.dirty:
            return
        data = _RegistryFile(peers=list(self._records.values())).model_dump_json(indent=1).encode()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".peers-", dir=self._path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, self._path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.dirty = False

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)

    def records(self) -> list[PeerRecord]:
        return sorted(self._records.values(), key=lambda record: (record.state != "alive", record.peer_id))

    def _put(self, record: PeerRecord) -> PeerRecord:
        self._records[record.peer_id] = record
        self.dirty = True
        if len(self._records) > MAX_RECORDS:
            stale = min(
                (item for item in self._records.values() if item.state != "alive"),
                key=lambda item: item.last_seen or 0.0,
                default=None,
            )
            if stale is not None:
                del self._records[stale.peer_id]
        return record

    def _current(self, peer_id: str, now: float) -> PeerRecord:
        return self._records.get(peer_id) or PeerRecord(peer_id=peer_id, first_seen=now)

    def connected(
        self,
        peer_id: str,
        *,
        account_id: str,
        node_name: str,
        address: str | None,
        software_version: str,
        models: tuple[ModelInfo, ...],
        load: int,
        now: float | None = None,
    ) -> PeerRecord:
        now = time.time() if now is None else now
        current = self._current(peer_id, now)
        return self._put(
            current.model_copy(
                update={
                    "account_id": account_id,
                    "node_name": node_name,
                    "address": address or current.address,
                    "software_version": software_version,
                    "models": models,
                    "load": load,
                    "last_seen": now,
                    "state": "alive",
                }
            )
        )

    def heard(self, peer_id: str, *, rtt_ms: float, load: int, now: float | None = None) -> PeerRecord | None:
        current = self._records.get(peer_id)
        if current is None:
            return None
        smoothed = (
            rtt_ms if current.rtt_ms is None else current.rtt_ms + RTT_SMOOTHING * (rtt_ms - current.rtt_ms)
        )
        return self._put(
            current.model_copy(
                update={
                    "rtt_ms": smoothed,
                    "load": load,
                    "last_seen": time.time() if now is None else now,
                    "state": "alive",
                }
            )
        )

    def lost(self, peer_id: str) -> PeerRecord | None:
        current = self._records.get(peer_id)
        if current is None or current.state == "dead":
            return current
        return self._put(current.model_copy(update={"state": "dead"}))

    def _decayed(self, record: PeerRecord, now: float) -> PeerRecord:
        if record.decayed_at <= 0:
            return record.model_copy(update={"decayed_at": now})
        factor = 0.5 ** (max(0.0, now - record.decayed_at) / self._half_life_s)
        return record.model_copy(
            update={name: getattr(record, name) * factor for name in DECAYING} | {"decayed_at": now}
        )

    def _count(self, peer_id: str, now: float | None = None, **increments: float) -> None:
        current = self._records.get(peer_id)
        if current is None:
            return
        now = time.time() if now is None else now
        record = self._decayed(current, now)
        self._put(
            record.model_copy(
                update={name: getattr(record, name) + value for name, value in increments.items()}
            )
        )

    def reputation_of(self, peer_id: str, now: float | None = None) -> PeerRecord | None:
        """The record with its counters decayed to ``now``."""
        current = self._records.get(peer_id)
        return None if current is None else self._decayed(current, time.time() if now is None else now)

    def outcome(
        self, peer_id: str, ok: bool, first_token_ms: float | None = None, now: float | None = None
    ) -> None:
        self._count(peer_id, now, **({"successes": 1.0} if ok else {"failures": 1.0}))
        current = self._records.get(peer_id)
        if current is not None and first_token_ms is not None:
            smoothed = (
                first_token_ms
                if current.latency_ms is None
                else current.latency_ms + RTT_SMOOTHING * (first_token_ms - current.latency_ms)
            )
            self._put(current.model_copy(update={"latency_ms": smoothed}))

    def paid(self, peer_id: str, credits: float, tokens: int, now: float | None = None) -> None:
        """A receipt settled for a request this peer served us."""
        self._count(
            peer_id, now, served_us_credits=credits, tokens_served=float(tokens), receipts_honoured=1.0
        )

    def earned(self, peer_id: str, credits: float, now: float | None = None) -> None:
        """A receipt settled for a request we served this peer."""
        self._count(peer_id, now, consumed_credits=credits, receipts_honoured=1.0)

    def unpaid_work(self, peer_id: str, credits: float, now: float | None = None) -> None:
        """Work served to this peer whose receipt never came: consumed all the same, and a miss."""
        self._count(peer_id, now, consumed_credits=credits, receipts_missed=1.0)

    def unpaid(self, peer_id: str, now: float | None = None) -> None:
        """A receipt exchange with this peer failed or was refused."""
        self._count(peer_id, now, receipts_missed=1.0)
