"""Bounds on what a peer can make a node hold, driven by hostile peers over real QUIC on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.config import ModelSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import IdentityError, PeerError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.identity.certificates import issue_device_certificate, raw_public_key
from mycellm.identity.keys import load_or_create_identity
from mycellm.identity.revocation_keeper import KNOWN_REVOCATIONS_FILE, RevocationKeeper
from mycellm.identity.revocations import REVOCATION_BOOK_MAX_BYTES, issue_revocation_list
from mycellm.network.codec import HEADER, encode_frame
from mycellm.network.messages import (
    ALPN,
    MAX_LISTS_PER_MESSAGE,
    DoneMessage,
    ErrorMessage,
    InferenceMessage,
    PeerAddress,
    PeersMessage,
    PingMessage,
)
from mycellm.network.peer_log import PeerLog
from mycellm.network.quic import FrameStream, PeerLink
from mycellm.network.service import PeerService
from mycellm.network.session import Session
from mycellm.network.tls import tls_certificate
from mycellm.types import GenerationRequest, NetworkId
from tests.peer_kit import peer_service, shared_network, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    asyncio.run((engine := LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))).start())
    return engine


@pytest.fixture
async def services() -> AsyncIterator[list[PeerService]]:
    started: list[PeerService] = []
    yield started
    for service in reversed(started):
        await service.stop()


async def _start(started: list[PeerService], service: PeerService) -> PeerService:
    await service.start()
    started.append(service)
    return service


async def _linked(client: PeerService, server: PeerService) -> Session:
    """The client's session with the server, once both ends have it."""
    session = await client.connect(f"127.0.0.1:{server.port}")
    await wait_for(lambda: client.peer_id in server.connected(), what="the session at the server")
    return session


def _request(
    engine: LlamaCppEngine, name: str, max_tokens: int = 1, network: NetworkDescription | None = None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=name,
        model=engine.models()[0].name,
        messages=({"role": "user", "content": "Say yes."},),
        max_tokens=max_tokens,
        temperature=0,
        network_id=None if network is None else NetworkId(network.network_id),
    )


def _peer_streams(link: PeerLink) -> int:
    """Streams the peer (the dialer: client-initiated ids) opened on ``link`` that are open here."""
    return sum(1 for stream_id in link.streams if stream_id % 4 == 0)


async def _answer(stream: FrameStream) -> DoneMessage | ErrorMessage:
    while not isinstance(message := await stream.receive(60.0), DoneMessage | ErrorMessage):
        pass
    return message


async def test_a_reset_stream_flood_keeps_no_state_and_other_links_are_served(
    tmp_path: Path, engine: LlamaCppEngine, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server", [engine]))
    hostile = await _start(services, peer_service(tmp_path, "hostile"))
    honest = await _start(services, peer_service(tmp_path, "honest"))
    session = await _linked(hostile, server)
    await _linked(honest, server)
    served = server._sessions.routed(hostile.peer_id)
    assert served is not None
    protocol = served.link._protocol
    quic, client = session.link._protocol._quic, session.link._protocol
    cap = 64  # max_streams_per_link's default
    peak = 0
    for _ in range(100):  # 100 rounds of 50: 5,000 streams opened, fed half a frame, then reset
        opened = []
        for _ in range(50):
            await wait_for(
                lambda: quic.get_next_available_stream_id() // 4 < quic._remote_max_streams_bidi,
                what="the server to grant more streams",
            )
            stream_id = quic.get_next_available_stream_id()
            quic.send_stream_data(stream_id, HEADER.pack(100)[:3], False)
            opened.append(stream_id)
        client.transmit()
        await asyncio.sleep(0.005)
        peak = max(peak, len(protocol._readers), _peer_streams(served.link))
        for stream_id in opened:
            quic.reset_stream(stream_id, 0)
        client.transmit()
        await asyncio.sleep(0.005)
        peak = max(peak, len(protocol._readers), _peer_streams(served.link))
    await wait_for(lambda: len(protocol._readers) <= 1, 10.0, "the readers of reset streams to go")
    assert peak <= cap + 1  # the control stream besides the capped ones
    assert _peer_streams(served.link) <= 1 and len(protocol._finished) <= 2 * cap + 50
    assert not served.link.closed and hostile.peer_id in server.connected()
    result = await honest.complete(server.peer_id, _request(engine, "honest-after-flood"))
    assert result.usage.completion_tokens >= 1


async def test_streams_over_the_cap_are_refused_with_a_typed_error_and_the_link_goes_on(
    tmp_path: Path, engine: LlamaCppEngine, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server", [engine], max_streams_per_link=4))
    hostile = await _start(services, peer_service(tmp_path, "hostile"))
    session = await _linked(hostile, server)
    # Streams opened and abandoned (half a frame, never ended) hold their slots ...
    abandoned = []
    for _ in range(5):
        abandoned.append(session.link.open_stream())  # aioquic numbers a stream once it carries data
        session.link.send_raw(abandoned[-1].stream_id, HEADER.pack(100)[:3], False)
    refused = await abandoned[-1].receive(5.0)
    assert isinstance(refused, ErrorMessage) and refused.code == "too_many_streams"
    assert await abandoned[-1].receive(5.0) is None
    served = server._sessions.routed(hostile.peer_id)
    assert served is not None and _peer_streams(served.link) <= 4
    # ... until the peer resets them: then their state goes and the slots are free again.
    for stream in abandoned[:3]:
        stream.reset()
    await wait_for(lambda: _peer_streams(served.link) <= 1, 15.0, "the reset streams to be forgotten")
    stream = session.link.open_stream()
    stream.send(InferenceMessage(request=_request(engine, "after-the-cap", network=shared_network(tmp_path))))
    assert isinstance(await _answer(stream), DoneMessage)
    assert hostile.peer_id in server.connected()


async def test_inbound_links_over_the_cap_are_refused_at_connect(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server", max_inbound_links=3))
    honest = await _start(services, peer_service(tmp_path, "honest"))
    await _linked(honest, server)
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for index in range(6):  # valid device certificates, each of its own account
            identity = load_or_create_identity(tmp_path / f"flood{index}", node_name=f"flood{index}")
            configuration = QuicConfiguration(
                is_client=True,
                alpn_protocols=[ALPN],
                verify_mode=ssl.CERT_NONE,
                certificate=tls_certificate(identity),
                private_key=identity.device_key,
            )
            clients.append(
                await stack.enter_async_context(
                    connect("127.0.0.1", server.port, configuration=configuration)
                )
            )
        await asyncio.sleep(0.5)
        inbound = [link for link in server.endpoint.links if not link.dialed]
        assert len(inbound) == 3
        # The node's own account of it, as /v1/node/peers shows it.
        links = server.describe()["links"]
        assert links["inbound"] == 3 and links["inbound_peak"] == 3 and links["max_inbound"] == 3
        refused = [client for client in clients if client._quic._close_event is not None]
        assert len(refused) == 4
        assert all("busy" in client._quic._close_event.reason_phrase for client in refused)  # type: ignore[union-attr]
        await asyncio.sleep(1.0)  # several heartbeats: the honest link is still served
        assert honest.peer_id in server.connected() and server.peer_id in honest.connected()


async def test_a_peer_that_floods_a_stream_gets_it_refused_and_keeps_its_link(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server", max_queued_frames_per_stream=8))
    hostile = await _start(services, peer_service(tmp_path, "hostile"))
    session = await _linked(hostile, server)
    flooded = session.link.open_stream()
    burst = b"".join(encode_frame(PingMessage(seq=index, sent_at=0.0)) for index in range(40))
    session.link.send_raw(flooded.stream_id, burst, False)  # one datagram: faster than any reader
    reply = await flooded.receive(5.0)
    assert isinstance(reply, ErrorMessage) and reply.code == "stream_flooded"
    huge = session.link.open_stream()  # one frame over the frame cap: refused before buffering
    session.link.send_raw(huge.stream_id, HEADER.pack(server._settings.max_frame_bytes + 1), False)
    reply = await huge.receive(5.0)
    assert isinstance(reply, ErrorMessage) and reply.code == "too_large"
    served = server._sessions.routed(hostile.peer_id)
    assert served is not None
    await wait_for(lambda: len(served.link._protocol._readers) <= 1, 5.0, "the refused streams' readers")
    await asyncio.sleep(1.0)  # heartbeats go on over the same link
    assert hostile.peer_id in server.connected() and not served.link.closed


async def test_requests_over_the_per_peer_cap_are_refused_before_any_work(
    tmp_path: Path, engine: LlamaCppEngine, services: list[PeerService]
) -> None:
    cap = 8
    server = await _start(services, peer_service(tmp_path, "server", [engine], max_requests_per_peer=cap))
    hostile = await _start(services, peer_service(tmp_path, "hostile"))
    session = await _linked(hostile, server)
    network = shared_network(tmp_path)
    streams = []
    for index in range(50):
        streams.append(stream := session.link.open_stream())
        stream.send(InferenceMessage(request=_request(engine, f"flood-{index}", 16, network)))
    answers = await asyncio.gather(*(_answer(stream) for stream in streams))
    done = [answer for answer in answers if isinstance(answer, DoneMessage)]
    refused = [answer for answer in answers if isinstance(answer, ErrorMessage)]
    # Served ones may end (freeing their place) while the flood arrives: the bound is on the peak.
    assert server._requests.peak_per_peer == cap
    assert len(done) + len(refused) == 50 and len(refused) >= 50 - 3 * cap
    assert {answer.code for answer in refused} == {"too_many_requests"}
    await wait_for(lambda: server.serving == 0, 10.0, "the served requests to end")
    assert server._requests._per_peer == {}
    stream = session.link.open_stream()  # within the cap again: served as before
    stream.send(InferenceMessage(request=_request(engine, "after", network=network)))
    assert isinstance(await _answer(stream), DoneMessage)


async def test_a_gossip_flood_is_dropped_over_the_budget_and_the_node_stays_responsive(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server", max_gossip_per_minute=100))
    # The flood queues behind the hostile peer's own pings: it must not give up on its link first.
    hostile = await _start(services, peer_service(tmp_path, "hostile", heartbeat_interval_s=60))
    honest = await _start(services, peer_service(tmp_path, "honest"))
    session = await _linked(hostile, server)
    await _linked(honest, server)
    known = len(server.registry.records())
    for index in range(10_000):
        entry = PeerAddress(
            peer_id=os.urandom(32).hex(),
            record=f"10.{index // 65536}.{index // 256 % 256}.{index % 256}:8421".encode(),
        )
        session.send(PeersMessage(peers=(entry,)))
    marker = 1 << 40  # a ping after the flood: its pong means every message before it was read
    session.send(session.ping(marker))
    # Either the server read the whole flood (the pong), or the flood outran its reader and the
    # control stream was refused as flooded (the hostile session ends); both within the bounds.
    await wait_for(
        lambda: marker not in session._pings or hostile.peer_id not in server.connected(),
        60.0,
        "the server to read or refuse the whole flood",
    )
    learned = len(server.registry.records()) - known
    assert learned <= 100
    record = server.registry.get(hostile.peer_id)
    assert record is not None and record.failures >= 1  # counted against its reputation
    await asyncio.sleep(0.6)
    assert honest.peer_id in server.connected() and server.peer_id in honest.connected()


def test_a_full_revocation_book_refuses_newcomers_and_keeps_enforcing_after_a_restart(tmp_path: Path) -> None:
    account = Ed25519PrivateKey.generate()
    device = Ed25519PrivateKey.generate()
    victim = issue_device_certificate(account, raw_public_key(device), name="stolen laptop")
    keeper = RevocationKeeper(tmp_path)
    revoked = issue_revocation_list(account, [raw_public_key(device)], serial=1)
    assert keeper.accept((revoked.to_bytes(),), source=None) == [revoked]
    fillers = tuple(
        issue_revocation_list(
            Ed25519PrivateKey.generate(), [os.urandom(32) for _ in range(1900)], serial=1
        ).to_bytes()
        for _ in range(REVOCATION_BOOK_MAX_BYTES // 64_000 + 8)
    )
    accepted = keeper.accept(fillers, source="f" * 64)
    assert 0 < len(accepted) < len(fillers)  # the lists past the cap are refused
    assert keeper.book.size_bytes <= REVOCATION_BOOK_MAX_BYTES and keeper.is_revoked(victim)
    restarted = RevocationKeeper(tmp_path)
    assert restarted.is_revoked(victim)
    assert len(restarted.lists()) == len(keeper.lists())


def test_a_revocation_book_that_cannot_be_read_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / KNOWN_REVOCATIONS_FILE
    path.write_bytes(b"\x00" * (REVOCATION_BOOK_MAX_BYTES + (1 << 20)))
    with pytest.raises(IdentityError, match="cannot read the revocations"):
        RevocationKeeper(tmp_path)
    path.write_bytes(b"not cbor")
    with pytest.raises(IdentityError, match="cannot read the revocations"):
        RevocationKeeper(tmp_path)


async def test_a_link_that_sends_no_hello_gives_its_inbound_slot_back(
    tmp_path: Path, services: list[PeerService]
) -> None:
    from mycellm.network.hello import HELLO_TIMEOUT_S

    server = await _start(services, peer_service(tmp_path, "server", max_inbound_links=2))
    identity = load_or_create_identity(tmp_path / "silent", node_name="silent")
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        verify_mode=ssl.CERT_NONE,
        certificate=tls_certificate(identity),
        private_key=identity.device_key,
    )
    async with connect("127.0.0.1", server.port, configuration=configuration) as silent:
        await wait_for(lambda: any(not link.dialed for link in server.endpoint.links), 5.0, "the silent link")
        # It passed TLS and says nothing: closed after the hello timeout, its slot free again.
        await wait_for(
            lambda: not any(not link.dialed for link in server.endpoint.links),
            HELLO_TIMEOUT_S + 3.0,
            "the silent link closed",
        )
        assert silent._quic._close_event is not None and "no hello" in silent._quic._close_event.reason_phrase
    honest = await _start(services, peer_service(tmp_path, "honest"))
    await _linked(honest, server)


async def test_a_request_stream_that_opens_with_the_wrong_kind_gets_a_typed_error(
    tmp_path: Path, services: list[PeerService]
) -> None:
    server = await _start(services, peer_service(tmp_path, "server"))
    client = await _start(services, peer_service(tmp_path, "client"))
    session = await _linked(client, server)
    stream = session.link.open_stream()
    stream.send(PingMessage(seq=1, sent_at=time.time()))
    reply = await stream.receive(10)
    assert isinstance(reply, ErrorMessage) and reply.code == "unexpected", reply
    assert "cannot open with ping" in reply.message
    assert client.peer_id in server.connected()  # the link goes on


def test_warnings_about_one_peer_are_bounded_and_the_rest_counted(caplog: pytest.LogCaptureFixture) -> None:
    log = PeerLog(lines=3, window_s=0.2)
    flood = logging.getLogger("flood")
    with caplog.at_level(logging.WARNING, logger="flood"):
        for index in range(1000):
            log.warning(flood, "mallory", "refused item %d", index)
        log.warning(flood, "honest", "one from another peer")
        time.sleep(0.25)
        log.warning(flood, "mallory", "after the window")
    lines = [record.getMessage() for record in caplog.records]
    assert lines[:3] == ["refused item 0", "refused item 1", "refused item 2"]
    assert "one from another peer" in lines
    assert "997 more warnings about peer mallory were not logged" in lines
    assert lines[-1] == "after the window" and len(lines) == 6


async def test_failed_dials_give_their_sockets_back(tmp_path: Path, services: list[PeerService]) -> None:
    client = await _start(services, peer_service(tmp_path, "client"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(20):
        with pytest.raises(PeerError):
            await client.endpoint.connect("127.0.0.1", dead_port, timeout_s=0.2)
    # Each dial had a socket of its own; once its connection is over, the socket is closed.
    await wait_for(lambda: open_fds() <= before + 2, 10, "the dials' sockets closed")


async def test_a_node_holding_more_lists_than_a_message_carries_still_greets_its_peers(
    tmp_path: Path, services: list[PeerService]
) -> None:
    # Valid lists of fresh accounts, as any peer may pass on: more than one message may carry.
    server = await _start(services, peer_service(tmp_path, "server"))
    lists = tuple(
        issue_revocation_list(Ed25519PrivateKey.generate(), [os.urandom(32)], serial=1).to_bytes()
        for _ in range(MAX_LISTS_PER_MESSAGE + 6)
    )
    assert len(server.revocations.accept(lists, source=None)) == len(lists)
    client = await _start(services, peer_service(tmp_path, "client"))
    await _linked(client, server)  # the server's greeting carries its lists in two messages
    await wait_for(lambda: len(client.revocations.lists()) == len(lists), 10, "every list at the client")
