"""What our peer link costs over bare aioquic: handshake, round-trip time and frames/s on loopback.

Both sides run in one process and one asyncio loop, in one run, in alternating rounds:

* mycellm: two QuicEndpoints with fresh identities (mutual TLS on device certificates, the
  certificate check, wire frames: pydantic models in CBOR behind a 4-byte length, one asyncio
  queue per stream). The server answers each PingMessage with a PongMessage on the same
  FrameStream and counts other frames, answering the count when the stream ends.
* bare aioquic: QuicConnectionProtocol subclasses with a self-signed Ed25519 certificate, ALPN
  "bench", CERT_NONE, no client certificate, the same 4-byte length framing around opaque bytes of
  the same sizes as our frames.

Round-trip time: one small frame out and its answer back on an open stream. Frames/s: N small
frames one way on a fresh stream (token chunks, as a peer streams an answer) until the receiver
has decoded every one. Handshake: connect until the link is usable (ours: both certificates
verified). Medians over rounds; ratios are mycellm / bare.

    .venv/bin/python bench/wire.py [--round-trips 500] [--frames 20000] [--rounds 5] [--handshakes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mycellm.errors import PeerError  # noqa: E402
from mycellm.identity.keys import load_or_create_identity  # noqa: E402
from mycellm.network.codec import encode_frame  # noqa: E402
from mycellm.network.messages import ChunkMessage, PingMessage, PongMessage  # noqa: E402
from mycellm.network.quic import FrameStream, PeerLink, QuicEndpoint  # noqa: E402

HOST = "127.0.0.1"  # loopback only
HEADER = struct.Struct("!I")
TOKEN = " token"  # one streamed token, as a ChunkMessage carries it
ECHO, SINK = b"E", b"S"  # first payload byte: which job the bare server does on that stream


# -- mycellm side ---------------------------------------------------------------------------------


async def echo_handler(link: PeerLink, stream: FrameStream) -> None:
    """Answer every ping with a pong; count any other frame and answer the count at stream end."""
    count = 0
    try:
        while (message := await stream.receive()) is not None:
            if isinstance(message, PingMessage):
                stream.send(PongMessage(seq=message.seq, sent_at=message.sent_at))
            else:
                count += 1
        stream.send(PongMessage(seq=count, sent_at=0.0), end=True)
    except PeerError:
        pass  # the link closed under a round-trip stream: the run is over


async def no_streams(link: PeerLink, stream: FrameStream) -> None:
    stream.reset()


class Ours:
    name = "mycellm"

    def __init__(self, work: Path) -> None:
        self._server = QuicEndpoint(
            load_or_create_identity(work / "b", node_name="bench-b"), on_stream=echo_handler
        )
        self._client = QuicEndpoint(
            load_or_create_identity(work / "a", node_name="bench-a"), on_stream=no_streams
        )
        self._port = 0
        self._link: PeerLink | None = None
        self._stream: FrameStream | None = None
        self._seq = 0

    async def start(self) -> None:
        self._port = await self._server.listen(HOST, 0)
        self._link = await self._client.connect(HOST, self._port)
        self._stream = self._link.open_stream()

    async def close(self) -> None:
        await self._client.close()
        await self._server.close()

    async def handshake(self) -> float:
        started = time.perf_counter()
        link = await self._client.connect(HOST, self._port)
        elapsed = time.perf_counter() - started
        link.close("handshake measured")
        return elapsed

    async def round_trips(self, count: int) -> list[float]:
        stream = self._stream
        assert stream is not None
        times = []
        for _ in range(count):
            self._seq += 1
            started = time.perf_counter()
            stream.send(PingMessage(seq=self._seq, sent_at=time.time()))
            reply = await stream.receive()
            times.append(time.perf_counter() - started)
            assert isinstance(reply, PongMessage) and reply.seq == self._seq, reply
        return times

    async def frames(self, count: int) -> float:
        assert self._link is not None
        stream = self._link.open_stream()
        started = time.perf_counter()
        for _ in range(count):
            stream.send(ChunkMessage(text=TOKEN))
        stream.end()
        reply = await stream.receive()
        elapsed = time.perf_counter() - started
        assert isinstance(reply, PongMessage) and reply.seq == count, reply
        return elapsed


# -- bare aioquic side ------------------------------------------------------------------------------


def bare_configuration(is_client: bool) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=is_client, alpn_protocols=["bench"], verify_mode=ssl.CERT_NONE, max_datagram_frame_size=None
    )
    if not is_client:
        key = Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
        now = datetime.datetime.now(datetime.UTC)
        configuration.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, algorithm=None)
        )
        configuration.private_key = key
    return configuration


class FramedProtocol(QuicConnectionProtocol):
    """Splits each stream's bytes into 4-byte-length frames."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if not isinstance(event, events.StreamDataReceived):
            return
        buffer = self._buffers.setdefault(event.stream_id, bytearray())
        buffer += event.data
        while len(buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer)
            if len(buffer) < HEADER.size + length:
                break
            body = bytes(buffer[HEADER.size : HEADER.size + length])
            del buffer[: HEADER.size + length]
            self.frame_received(event.stream_id, body)
        if event.end_stream:
            self._buffers.pop(event.stream_id, None)
            self.stream_ended(event.stream_id)

    def send_frame(self, stream_id: int, body: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, HEADER.pack(len(body)) + body, end)
        self.transmit()

    def frame_received(self, stream_id: int, body: bytes) -> None:
        raise NotImplementedError

    def stream_ended(self, stream_id: int) -> None:
        pass


class BareServer(FramedProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts: dict[int, int] = {}

    def frame_received(self, stream_id: int, body: bytes) -> None:
        if body[:1] == ECHO:
            self.send_frame(stream_id, body)
        else:
            self._counts[stream_id] = self._counts.get(stream_id, 0) + 1

    def stream_ended(self, stream_id: int) -> None:
        self.send_frame(stream_id, HEADER.pack(self._counts.pop(stream_id, 0)), end=True)


class BareClient(FramedProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queues: dict[int, asyncio.Queue[bytes]] = {}

    def open_stream(self) -> int:
        stream_id = self._quic.get_next_available_stream_id()
        self.queues[stream_id] = asyncio.Queue()
        return stream_id

    def frame_received(self, stream_id: int, body: bytes) -> None:
        queue = self.queues.get(stream_id)
        if queue is not None:
            queue.put_nowait(body)

    def end_stream(self, stream_id: int) -> None:
        self._quic.send_stream_data(stream_id, b"", True)
        self.transmit()


class Bare:
    name = "bare aioquic"

    def __init__(self, ping_bytes: int, chunk_bytes: int) -> None:
        self._ping = ECHO + bytes(ping_bytes - 1)
        self._chunk = SINK + bytes(chunk_bytes - 1)
        self._server: QuicServer | None = None
        self._port = 0
        self._exits = AsyncExitStack()
        self._client: BareClient | None = None
        self._stream = 0

    async def start(self) -> None:
        self._server = await serve(
            HOST, 0, configuration=bare_configuration(False), create_protocol=BareServer
        )
        transport = cast(asyncio.DatagramTransport, self._server._transport)
        self._port = int(transport.get_extra_info("sockname")[1])
        self._client = cast(
            BareClient,
            await self._exits.enter_async_context(
                connect(HOST, self._port, configuration=bare_configuration(True), create_protocol=BareClient)
            ),
        )
        self._stream = self._client.open_stream()

    async def close(self) -> None:
        await self._exits.aclose()
        if self._server is not None:
            self._server.close()

    async def handshake(self) -> float:
        started = time.perf_counter()
        async with connect(
            HOST, self._port, configuration=bare_configuration(True), create_protocol=BareClient
        ):
            elapsed = time.perf_counter() - started
        return elapsed

    async def round_trips(self, count: int) -> list[float]:
        client = self._client
        assert client is not None
        queue = client.queues[self._stream]
        times = []
        for _ in range(count):
            started = time.perf_counter()
            client.send_frame(self._stream, self._ping)
            reply = await queue.get()
            times.append(time.perf_counter() - started)
            assert len(reply) == len(self._ping)
        return times

    async def frames(self, count: int) -> float:
        client = self._client
        assert client is not None
        stream_id = client.open_stream()
        started = time.perf_counter()
        for _ in range(count):
            client.send_frame(stream_id, self._chunk)
        client.end_stream(stream_id)
        reply = await client.queues[stream_id].get()
        elapsed = time.perf_counter() - started
        del client.queues[stream_id]
        assert HEADER.unpack(reply)[0] == count, reply
        return elapsed


# -- the run -------------------------------------------------------------------------------------------

Side = Ours | Bare


async def measure(args: argparse.Namespace, sides: list[Side]) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        side.name: {"handshake": [], "rtt": [], "frames": []} for side in sides
    }
    for side in sides:  # warm: code paths, allocators, congestion window
        await side.handshake()
        await side.round_trips(max(50, args.round_trips // 10))
        await side.frames(max(1000, args.frames // 10))
    for round_number in range(args.rounds):
        # Flip the order every round so drift of a noisy machine hits both sides alike.
        order = sides if round_number % 2 == 0 else sides[::-1]
        steps: list[tuple[str, Callable[[Side], Awaitable[Any]]]] = [
            ("handshake", lambda side: gather_handshakes(side, args.handshakes)),
            ("rtt", lambda side: side.round_trips(args.round_trips)),
            ("frames", lambda side: side.frames(args.frames)),
        ]
        for metric, step in steps:
            for side in order:
                value = await step(side)
                if metric == "frames":
                    results[side.name][metric].append(args.frames / value)
                else:
                    results[side.name][metric].extend(value)
    return results


async def gather_handshakes(side: Side, count: int) -> list[float]:
    return [await side.handshake() for _ in range(count)]


def report(results: dict[str, dict[str, list[float]]]) -> None:
    ours, bare = results["mycellm"], results["bare aioquic"]
    rows = [
        ("handshake median ms", 1e3, "handshake", statistics.median),
        ("rtt median us", 1e6, "rtt", statistics.median),
        ("rtt p90 us", 1e6, "rtt", lambda values: statistics.quantiles(values, n=10)[-1]),
        ("frames/s median", 1.0, "frames", statistics.median),
    ]
    header = f"{'metric':<22}{'mycellm':>12}{'bare aioquic':>14}{'ratio':>9}{'added':>12}"
    print(header)
    print("-" * len(header))
    for label, scale, key, pick in rows:
        a, b = pick(ours[key]) * scale, pick(bare[key]) * scale
        # For frames/s, the time added per frame in microseconds: what a token stream pays.
        added = f"{(1 / a - 1 / b) * 1e6:.1f} us/fr" if key == "frames" else f"{a - b:.1f}"
        print(f"{label:<22}{a:>12.1f}{b:>14.1f}{a / b:>9.3f}{added:>12}")


async def run(args: argparse.Namespace) -> None:
    ping_bytes = len(encode_frame(PingMessage(seq=1000, sent_at=time.time()))) - HEADER.size
    chunk_bytes = len(encode_frame(ChunkMessage(text=TOKEN))) - HEADER.size
    with tempfile.TemporaryDirectory(prefix="mycellm-bench-wire-") as work:
        ours, bare = Ours(Path(work)), Bare(ping_bytes, chunk_bytes)
        try:
            await ours.start()
            await bare.start()
            print(
                f"loopback, one asyncio loop, cores {os.cpu_count()} (load {os.getloadavg()[0]:.1f}); "
                f"ping frame {ping_bytes} B, chunk frame {chunk_bytes} B (+4 B length); "
                f"{args.rounds} rounds x {args.round_trips} round trips, "
                f"{args.frames} frames, {args.handshakes} handshakes; ours is mutual TLS, bare is server-only"
            )
            results = await measure(args, [ours, bare])
        finally:
            await ours.close()
            await bare.close()
    report(results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-trips", type=int, default=500, help="round trips per side per round")
    parser.add_argument("--frames", type=int, default=20000, help="one-way frames per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=4, help="handshakes per side per round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
