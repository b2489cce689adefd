"""A peer that falls silent mid-answer is noticed in about a second, not at the next heartbeats.

Real QUIC on loopback and the real SmolLM2 engine; the serving peer's death is its socket dropping
every datagram (a lossy socket at the boundary), so its link never closes on its own, and the
heartbeats are a minute apart: only the stall clock and its probe can notice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mycellm.config import ModelSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import PeerError
from mycellm.network.service import PeerService
from mycellm.network.stalls import PROBE_FLOOR_S, StallClock
from mycellm.types import GenerationRequest
from tests.nodes import LONG_JSON
from tests.peer_kit import peer_service, wait_for

pytestmark = pytest.mark.timeout(120)

SLOW_HEARTBEAT = {"heartbeat_interval_s": 60.0, "heartbeat_misses": 3}


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=2048, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture
async def pair(tmp_path: Path, engine: LlamaCppEngine) -> AsyncIterator[tuple[PeerService, PeerService]]:
    seeder = peer_service(tmp_path, "seeder", [engine], **SLOW_HEARTBEAT)
    port = await seeder.start()
    relay = peer_service(tmp_path, "relay", bootstrap_peers=(f"127.0.0.1:{port}",), **SLOW_HEARTBEAT)
    await relay.start()
    await wait_for(lambda: seeder.peer_id in relay.connected(), what="the relay's link")
    yield relay, seeder
    await relay.stop()
    await seeder.stop()


def _request(engine: LlamaCppEngine, request_id: str, **fields: object) -> GenerationRequest:
    values = {
        "request_id": request_id,
        "model": engine.models()[0].name,
        "messages": ({"role": "user", "content": "Write a long essay."},),
        "max_tokens": 600,
        "response_format": LONG_JSON,
    }
    return GenerationRequest.model_validate(values | fields)


def _silence(service: PeerService) -> None:
    """Every datagram the service sends from now on is dropped: on its listening socket, and on the
    sockets of the links it dialed (either end may have dialed the link requests go over)."""
    transports = [service.endpoint._server._transport]  # type: ignore[union-attr]
    transports += [session.link._protocol._transport for session in service._sessions.served_sessions()]
    for transport in transports:
        transport.sendto = lambda *args, **kwargs: None


async def _pull_until_error(relay: PeerService, request_id: str) -> PeerError:
    while True:
        try:
            await relay.pull(request_id, 30.0)
        except PeerError as error:
            return error


async def test_a_peer_silent_mid_stream_fails_the_stream_in_about_a_second(
    pair: tuple[PeerService, PeerService], engine: LlamaCppEngine
) -> None:
    relay, seeder = pair
    await relay.open(seeder.peer_id, _request(engine, "stall-1"), 30.0)
    for _ in range(3):
        await relay.pull("stall-1", 10.0)
    _silence(seeder)  # the seeder's machine is gone
    died = time.monotonic()
    error = await asyncio.wait_for(_pull_until_error(relay, "stall-1"), 30.0)
    noticed_s = time.monotonic() - died
    assert "stalled" in error.message and "no answer to a probe" in error.message
    # The floor (1 s, or a few of the stream's gaps on a slow machine) plus one probe (0.5 s), with
    # room for a loaded machine: bench/failover.py measures it; the heartbeats alone would take
    # three minutes.
    assert noticed_s < 10.0 + PROBE_FLOOR_S, noticed_s
    # Counted against the peer at once (its routes rank below the others); the link is left to
    # the heartbeats, and a probe is never a missed heartbeat.
    record = relay.registry.get(seeder.peer_id)
    assert record is not None and record.failures > 0 and record.success_rate < 1.0
    session = relay._sessions.routed(seeder.peer_id)
    assert session is not None and session.unanswered_pings == 0


async def test_a_peer_whose_process_is_gone_is_noticed_at_the_early_probe(
    pair: tuple[PeerService, PeerService], engine: LlamaCppEngine
) -> None:
    relay, seeder = pair
    await relay.open(seeder.peer_id, _request(engine, "gone-1"), 30.0)
    for _ in range(3):
        await relay.pull("gone-1", 10.0)
    # The seeder's process is gone, its host is not: its port is closed, with no QUIC goodbye, so
    # the host answers the relay's early probe with ICMP port unreachable (the relay dialed it).
    transport = seeder.endpoint._server._transport  # type: ignore[union-attr]
    transport.sendto = lambda *args, **kwargs: None  # what it still tries to send goes nowhere
    transport.close()
    died = time.monotonic()
    error = await asyncio.wait_for(_pull_until_error(relay, "gone-1"), 30.0)
    assert "is gone" in error.message and "refused a probe" in error.message, error.message
    assert time.monotonic() - died < 10.0  # half the floor on an idle machine; no probe wait
    record = relay.registry.get(seeder.peer_id)
    assert record is not None and record.failures > 0


async def test_a_live_peer_reading_a_long_prompt_is_probed_and_waited_for(
    tmp_path: Path, engine: LlamaCppEngine
) -> None:
    # A stall floor far below the time the seeder takes to read the prompt: every silence is
    # probed, the live seeder answers each probe, and the answer arrives whole.
    seeder = peer_service(tmp_path, "seeder", [engine], **SLOW_HEARTBEAT)
    port = await seeder.start()
    relay = peer_service(
        tmp_path, "relay", bootstrap_peers=(f"127.0.0.1:{port}",), stall_floor_s=0.02, **SLOW_HEARTBEAT
    )
    await relay.start()
    try:
        await wait_for(lambda: seeder.peer_id in relay.connected(), what="the relay's link")
        long_prompt = " ".join(f"item {number}," for number in range(200))
        request = _request(
            engine,
            "slow-1",
            messages=({"role": "user", "content": long_prompt},),
            max_tokens=8,
            response_format=None,
        )
        started = time.monotonic()
        result = await relay.complete(seeder.peer_id, request)
        assert time.monotonic() - started > 0.2  # the prompt took longer than many stall floors
        assert result.usage.prompt_tokens > 500 and result.usage.completion_tokens <= 8
        assert seeder.peer_id in relay.connected()
        record = relay.registry.get(seeder.peer_id)
        assert record is not None and record.failures == 0 and record.rtt_ms is not None  # probes' pongs
    finally:
        await relay.stop()
        await seeder.stop()


def test_the_stall_clock_follows_the_streams_pace() -> None:
    clock = StallClock(floor_s=1.0)
    assert clock.timeout_s() == 1.0  # before any frame: the floor
    moment = time.monotonic()
    clock.heard(moment + 30.0)  # a first frame after a long prompt: not the stream's pace
    moment += 30.0
    for step in range(1, 20):
        clock.heard(moment + step * 0.01)  # a frame every 10 ms
    assert clock.timeout_s() == 1.0  # a fast stream is never given less than the floor
    slow = StallClock(floor_s=1.0)
    for step in range(1, 20):
        slow.heard(moment + step * 0.5)  # a frame every half second (a slow machine)
    assert 2.5 < slow.timeout_s() < 3.5  # six gaps of silence before a probe
