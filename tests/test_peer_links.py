"""Peer links over real QUIC on loopback: forwarding, cancel, heartbeats, exchange, and every refusal."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.config import ModelSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.errors import PeerError
from mycellm.federation.held import HeldNetworks
from mycellm.identity.certificates import issue_device_certificate
from mycellm.identity.devices import add_device, revoke_device
from mycellm.identity.keys import NodeIdentity, load_or_create_identity
from mycellm.network.codec import HEADER, encode_frame
from mycellm.network.hello import make_hello
from mycellm.network.messages import ErrorMessage, HelloMessage, PingMessage, PongMessage
from mycellm.network.quic import QuicEndpoint
from mycellm.network.service import PeerService
from mycellm.types import EmbeddingRequest, GenerationRequest
from tests.nodes import LONG_JSON
from tests.peer_kit import admit, crafted_certificate, peer_service, refusal_reason, shared_network, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=1024, threads=2))
    asyncio.run(engine.start())
    return engine


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[PeerService]:
    service = peer_service(tmp_path, "server")
    await service.start()
    yield service
    await service.stop()


def _unchanged(service: PeerService) -> None:
    assert service.connected() == []
    assert service.registry.records() == []
    assert service.serving == 0


async def test_a_relay_streams_cancels_and_embeds_through_its_peer(
    tmp_path: Path, engine: LlamaCppEngine
) -> None:
    seeder = peer_service(tmp_path, "seeder", [engine])
    port = await seeder.start()
    relay = peer_service(tmp_path, "relay", bootstrap_peers=(f"127.0.0.1:{port}",))
    await relay.start()
    try:
        await wait_for(lambda: seeder.peer_id in relay.connected(), what="the relay's link")
        model = engine.models()[0].name
        request = GenerationRequest(
            request_id="s-1",
            model=model,
            messages=({"role": "user", "content": "Name a color."},),
            max_tokens=12,
        )
        first = await relay.open(seeder.peer_id, request, 30.0)
        pieces, chunk = [first.text], first
        while not chunk.is_final:
            chunk = await relay.pull("s-1", 10.0) or chunk.model_copy(update={"text": ""})
            pieces.append(chunk.text)
        assert chunk.usage is not None and chunk.usage.completion_tokens <= 12
        direct = await relay.complete(seeder.peer_id, request.model_copy(update={"request_id": "s-2"}))
        assert direct.usage.prompt_tokens == chunk.usage.prompt_tokens
        vectors = await relay.embed(
            seeder.peer_id, EmbeddingRequest(request_id="e-1", model=model, inputs=("hello",)), 30.0
        )
        assert len(vectors.vectors) == 1 and len(vectors.vectors[0]) > 10
        record = relay.registry.get(seeder.peer_id)
        assert record is not None and record.successes == pytest.approx(3.0, rel=1e-3)
        assert record.models[0].name == model

        # Cancel on the requesting side stops the generation on the serving side.
        endless = request.model_copy(
            update={"request_id": "s-3", "max_tokens": 900, "response_format": LONG_JSON}
        )
        await relay.open(seeder.peer_id, endless, 30.0)
        assert seeder.serving == 1
        assert await relay.cancel("s-3")
        await wait_for(lambda: seeder.serving == 0 and seeder.load == 0, 5.0, "the remote cancel")
    finally:
        await relay.stop()
        await seeder.stop()


async def test_heartbeats_notice_a_silent_peer_and_redial_it(tmp_path: Path) -> None:
    quiet = peer_service(tmp_path, "quiet")
    port = await quiet.start()
    watcher = peer_service(tmp_path, "watcher", bootstrap_peers=(f"127.0.0.1:{port}",), heartbeat_misses=2)
    await watcher.start()
    try:
        await wait_for(lambda: quiet.peer_id in watcher.connected(), what="the link")
        await wait_for(
            lambda: (watcher.registry.get(quiet.peer_id) or object()).__dict__.get("rtt_ms"), what="a pong"
        )
        # The quiet peer stops answering (its socket drops every datagram): a lossy socket, not a close.
        transport = quiet.endpoint._server._transport  # type: ignore[union-attr]
        original = transport.sendto
        transport.sendto = lambda *args, **kwargs: None
        await wait_for(lambda: quiet.peer_id not in watcher.connected(), 3.0, "dead-peer detection")
        record = watcher.registry.get(quiet.peer_id)
        assert record is not None and record.state == "dead"
        transport.sendto = original
        await wait_for(lambda: quiet.peer_id in watcher.connected(), 10.0, "the redial")
        assert watcher.registry.get(quiet.peer_id).state == "alive"  # type: ignore[union-attr]
    finally:
        await watcher.stop()
        await quiet.stop()


async def test_peers_are_exchanged_and_the_registry_survives_a_restart(tmp_path: Path) -> None:
    hub = peer_service(tmp_path, "hub")
    hub_port = await hub.start()
    leaf = peer_service(tmp_path, "leaf", bootstrap_peers=(f"127.0.0.1:{hub_port}",))
    await leaf.start()
    newcomer = peer_service(tmp_path, "newcomer", bootstrap_peers=(f"127.0.0.1:{hub_port}",))
    await newcomer.start()
    try:
        # The newcomer only knows the hub, and learns the leaf from it.
        await wait_for(lambda: leaf.peer_id in newcomer.connected(), 10.0, "a link learned by exchange")
    finally:
        await newcomer.stop()
    restarted = peer_service(tmp_path, "newcomer")  # no bootstrap: only what the registry remembers
    await restarted.start()
    try:
        assert {record.peer_id for record in restarted.registry.records()} >= {hub.peer_id, leaf.peer_id}
        await wait_for(
            lambda: {hub.peer_id, leaf.peer_id} <= set(restarted.connected()),
            10.0,
            "redials from the registry",
        )
    finally:
        await restarted.stop()
        await leaf.stop()
        await hub.stop()


# -- refusals: TLS identity ----------------------------------------------------------------------


async def test_a_client_without_a_certificate_is_refused(server: PeerService) -> None:
    reason = await refusal_reason(server.port, None, None)
    assert "presented no certificate" in reason
    _unchanged(server)


async def test_a_self_signed_certificate_without_an_account_is_refused(server: PeerService) -> None:
    key = Ed25519PrivateKey.generate()
    reason = await refusal_reason(server.port, crafted_certificate(key, None), key)
    assert "carries no device certificate" in reason
    _unchanged(server)


async def test_a_tls_key_that_is_not_the_device_key_is_refused(server: PeerService, tmp_path: Path) -> None:
    other = load_or_create_identity(tmp_path / "other", node_name="other")
    key = Ed25519PrivateKey.generate()  # not the key other's device certificate names
    reason = await refusal_reason(server.port, crafted_certificate(key, other.certificate.to_bytes()), key)
    assert "not the device key" in reason
    _unchanged(server)


async def test_a_wrong_account_signature_is_refused(server: PeerService) -> None:
    account, impostor, device = (Ed25519PrivateKey.generate() for _ in range(3))
    from mycellm.identity.certificates import raw_public_key as _raw_public_key

    genuine = issue_device_certificate(account, _raw_public_key(device), name="forged")
    # Claims ``account`` but is signed by another key.
    forged = genuine.model_copy(update={"signature": impostor.sign(genuine.signed_payload())})
    reason = await refusal_reason(server.port, crafted_certificate(device, forged.to_bytes()), device)
    assert "signature does not verify" in reason
    _unchanged(server)


async def test_an_expired_certificate_is_refused(server: PeerService) -> None:
    account, device = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    from mycellm.identity.certificates import raw_public_key as _raw_public_key

    old = issue_device_certificate(account, _raw_public_key(device), name="old", validity_s=60, now=1_000_000)
    reason = await refusal_reason(server.port, crafted_certificate(device, old.to_bytes()), device)
    assert "expired" in reason
    _unchanged(server)


async def test_a_revoked_device_is_refused_here_and_by_peers_that_hear_of_it(tmp_path: Path) -> None:
    owner = peer_service(tmp_path, "owner")
    port = await owner.start()
    listener = peer_service(tmp_path, "listener")
    listener_port = await listener.start()
    device_dir = tmp_path / "laptop"
    add_device(tmp_path / "owner", "laptop", device_dir)
    laptop = peer_service(tmp_path, "laptop", bootstrap_peers=(f"127.0.0.1:{port}",))
    await laptop.start()
    try:
        await wait_for(lambda: laptop.peer_id in owner.connected(), what="the device's link")
        revoke_device(tmp_path / "owner", "laptop")
        # The owner reads its account's new list, drops the device, and tells its peers.
        await wait_for(
            lambda: laptop.peer_id not in owner.connected(), 5.0, "the revoked device's link to close"
        )
        await owner.connect(f"127.0.0.1:{listener_port}")
        await wait_for(lambda: len(listener.revocations.lists()) == 1, 5.0, "the gossiped revocation list")
        for target in (port, listener_port):
            with pytest.raises(PeerError, match="revoked"):
                await laptop.connect(f"127.0.0.1:{target}")
        assert laptop.peer_id not in listener.connected() and listener.registry.get(laptop.peer_id) is None
    finally:
        for service in (laptop, listener, owner):
            await service.stop()


# -- refusals: hello and frames --------------------------------------------------------------------


def _memberships(tmp_path: Path, identity: NodeIdentity) -> tuple[bytes, ...]:
    """The client's memberships of the test network, as its hello presents them."""
    held = HeldNetworks(tmp_path / "client", identity)
    held.refresh()
    return tuple(network.membership.to_bytes() for network in held.networks())


async def _linked(tmp_path: Path, server: PeerService, name: str = "client") -> tuple[QuicEndpoint, object]:
    identity = load_or_create_identity(tmp_path / name, node_name=name)
    admit(tmp_path, tmp_path / name, shared_network(tmp_path))

    async def ignore(link: object, stream: object) -> None:
        return None

    client = QuicEndpoint(identity, on_stream=ignore)  # type: ignore[arg-type]
    link = await client.connect("127.0.0.1", server.port)
    return client, link


async def test_a_hello_replayed_on_another_connection_is_refused(server: PeerService, tmp_path: Path) -> None:
    client, first = await _linked(tmp_path, server)
    try:
        identity = client.identity
        hello = make_hello(
            identity,
            server.peer_id,
            first.binding,
            node_name="c",
            address=None,
            models=(),
            load=0,
            memberships=_memberships(tmp_path, identity),
        )
        control = first.open_stream()
        control.send(hello)
        assert isinstance(await control.receive(5.0), HelloMessage)
        await wait_for(lambda: identity.peer_id in server.connected(), what="the first session")
        second = await client.connect("127.0.0.1", server.port)
        replay = second.open_stream()
        replay.send(hello)  # signed for the first connection
        answer = await replay.receive(5.0)
        assert isinstance(answer, ErrorMessage) and answer.code == "replayed"
        await asyncio.wait_for(second.wait_closed(), 5.0)
        assert "refused" in second.close_reason
        assert server.session(identity.peer_id).link.binding == first.binding  # the first link stands
    finally:
        await client.close()


async def test_a_stream_before_the_hello_is_refused(server: PeerService, tmp_path: Path) -> None:
    client, link = await _linked(tmp_path, server)
    try:
        stream = link.open_stream()
        stream.send(PingMessage(seq=1, sent_at=0.0))
        answer = await stream.receive(5.0)
        assert isinstance(answer, ErrorMessage) and answer.code == "unexpected"
        await asyncio.wait_for(link.wait_closed(), 5.0)
        _unchanged(server)
    finally:
        await client.close()


async def _next(control: object, kind: type) -> object:
    """The next message of ``kind`` on a control stream (the server also pings and asks for peers)."""
    while True:
        message = await control.receive(5.0)  # type: ignore[attr-defined]
        if isinstance(message, kind):
            return message


async def _session(tmp_path: Path, server: PeerService) -> tuple[QuicEndpoint, object, object]:
    client, link = await _linked(tmp_path, server)
    control = link.open_stream()
    control.send(
        make_hello(
            client.identity,
            server.peer_id,
            link.binding,
            node_name="c",
            address=None,
            models=(),
            load=0,
            memberships=_memberships(tmp_path, client.identity),
        )
    )
    assert isinstance(await control.receive(5.0), HelloMessage)
    return client, link, control


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (HEADER.pack(2 << 20), "too_large"),
        (HEADER.pack(16) + os.urandom(16), "bad_frame"),
        (HEADER.pack(3) + b"\xa0\xa0\xa0", "bad_frame"),
    ],
    ids=["oversized", "garbage", "trailing-garbage"],
)
async def test_bad_frames_are_answered_with_a_typed_error(
    server: PeerService, tmp_path: Path, raw: bytes, code: str
) -> None:
    client, link, control = await _session(tmp_path, server)
    try:
        stream = link.open_stream()
        link.send_raw(stream.stream_id, raw, False)
        answer = await stream.receive(5.0)
        assert isinstance(answer, ErrorMessage) and answer.code == code
        assert server.serving == 0
        # The link itself is still good.
        control.send(PingMessage(seq=5, sent_at=0.0))
        assert await _next(control, PongMessage) == PongMessage(seq=5, sent_at=0.0, load=0)
    finally:
        await client.close()


async def test_an_unknown_kind_is_answered_and_the_stream_goes_on(
    server: PeerService, tmp_path: Path
) -> None:
    client, link, control = await _session(tmp_path, server)
    try:
        body = cbor2.dumps({"v": 1, "k": "teleport", "b": {"to": "mars"}})
        link.send_raw(control.stream_id, HEADER.pack(len(body)) + body, False)
        answer = await _next(control, ErrorMessage)
        assert (
            isinstance(answer, ErrorMessage)
            and answer.code == "unknown_kind"
            and "teleport" in answer.message
        )
        link.send_raw(control.stream_id, encode_frame(PingMessage(seq=9, sent_at=1.0)), False)
        assert await _next(control, PongMessage) == PongMessage(seq=9, sent_at=1.0, load=0)
    finally:
        await client.close()
