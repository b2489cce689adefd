"""PeerRegistry: decaying reputation, the freeloader test, the file that survives restarts, peer routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mycellm.network.registry import PeerRegistry
from mycellm.routing.peer_routes import peer_routes
from mycellm.types import ModelInfo, PeerId

PEER = "ab" * 32
DAY = 86400.0


def _registry(path: Path | None = None) -> PeerRegistry:
    registry = PeerRegistry(path, half_life_s=7 * DAY)
    registry.connected(
        PEER,
        account_id="cd" * 32,
        node_name="p",
        address="127.0.0.1:9",
        software_version="1",
        models=(),
        load=0,
        now=0.0,
    )
    return registry


def test_counters_halve_every_half_life() -> None:
    registry = _registry()
    registry.paid(PEER, 8.0, 1000, now=1.0)
    registry.earned(PEER, 2.0, now=1.0)
    later = registry.reputation_of(PEER, now=1.0 + 7 * DAY)
    assert later is not None
    assert later.served_us_credits == pytest.approx(4.0)
    assert later.tokens_served == pytest.approx(500.0)
    assert later.consumed_credits == pytest.approx(1.0)
    assert later.receipts_honoured == pytest.approx(1.0)  # 2 receipts, halved


def test_reputation_falls_with_failures_and_missed_receipts_and_recovers_with_time() -> None:
    registry = _registry()
    for _ in range(4):
        registry.outcome(PEER, True, now=1.0)
    registry.outcome(PEER, False, now=1.0)
    registry.unpaid(PEER, now=1.0)
    record = registry.reputation_of(PEER, now=1.0)
    assert record is not None and record.success_rate == pytest.approx(0.8)
    assert record.reputation == pytest.approx(0.8 * 0.5)
    registry.paid(PEER, 1.0, 10, now=1.0 + 70 * DAY)  # ten half-lives later the old miss hardly counts
    recovered = registry.reputation_of(PEER, now=1.0 + 70 * DAY)
    assert recovered is not None and recovered.reputation > 0.7


def test_freeloading_needs_the_grace_spent_and_the_ratio_exceeded() -> None:
    registry = _registry()
    registry.earned(PEER, 5.0, now=1.0)
    record = registry.reputation_of(PEER, now=1.0)
    assert record is not None and not record.freeloading(grace_credits=10.0, max_ratio=4.0)
    registry.earned(PEER, 10.0, now=1.0)
    record = registry.reputation_of(PEER, now=1.0)
    assert record is not None and record.freeloading(grace_credits=10.0, max_ratio=4.0)
    registry.paid(PEER, 4.0, 100, now=1.0)
    record = registry.reputation_of(PEER, now=1.0)
    assert record is not None and not record.freeloading(grace_credits=10.0, max_ratio=4.0)


def test_the_registry_file_survives_and_bad_files_are_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    registry = _registry(path)
    registry.paid(PEER, 3.0, 30, now=1.0)
    registry.save()
    reloaded = PeerRegistry(path)
    record = reloaded.get(PEER)
    assert record is not None and record.state == "unknown" and record.served_us_credits == pytest.approx(3.0)
    path.write_text("{not json")
    assert PeerRegistry(path).records() == []


def test_what_is_known_of_a_peer_becomes_one_route_per_model() -> None:
    registry = _registry()
    registry.heard(PEER, rtt_ms=12.0, load=3, now=1.0)
    registry.outcome(PEER, True, now=1.0)
    registry.outcome(PEER, False, now=1.0)
    record = registry.reputation_of(PEER, now=1.0)
    assert record is not None
    models = (
        ModelInfo(name="small", backend="llama_cpp"),
        ModelInfo(name="big", backend="vllm", tier="capable"),
    )
    routes = peer_routes(
        PeerId(PEER), models, rtt_ms=record.rtt_ms, load=record.load, reputation=record.reputation
    )
    assert [route.model for route in routes] == list(models)
    for route in routes:
        assert (route.kind, route.target, route.hops) == ("peer", PEER, 1)
        assert (route.latency_ms, route.load, route.success_rate) == (12.0, 3, pytest.approx(0.5))
    # Before the first pong the round trip is unknown: no latency counts against the route.
    (fresh,) = peer_routes(PeerId(PEER), models[:1], rtt_ms=None, load=0, reputation=1.0)
    assert fresh.latency_ms == 0.0 and fresh.success_rate == 1.0
