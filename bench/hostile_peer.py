"""A hostile peer for ``bench/soak.py``: a real QUIC peer with a valid identity that attacks its links.

It joins its bootstrap's public network as any node does (a PeerService, no models, no books) and
links to every target; then every ``--round-s`` until SIGTERM, on each target: reset-stream flood;
control-stream floods far above the gossip budget (peer lists of bogus addresses, forged receipts,
bad revocation lists, a few valid ones of fresh accounts); oversized and malformed frames on request
streams and malformed ones on the control stream; requests it never pays for. Each round one target
also gets an inbound-link flood over ``max_inbound_links`` or links that never open a stream (of
non-member identities). The attacks copy tests/test_link_bounds.py; counts of what it sent and saw
go to ``--stats`` (JSON, after each round).

    .venv/bin/python bench/hostile_peer.py --data-dir DIR --bootstrap HOST:PORT \
        --target a=HOST:PORT [--target ...] --stats FILE [--round-s 5] [--gossip 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hostile_gossip import bogus_peers, revocation, sybil  # noqa: E402
from mycellm.config import NodeSettings, split_address  # noqa: E402
from mycellm.engines.names import BUNDLED_NAME  # noqa: E402
from mycellm.errors import MycellmError  # noqa: E402
from mycellm.identity.keys import load_or_create_identity  # noqa: E402
from mycellm.ledger.receipts import Receipt, ReceiptTerms  # noqa: E402
from mycellm.ledger.spends import sign_spend  # noqa: E402
from mycellm.network import messages as wire  # noqa: E402
from mycellm.network.codec import HEADER  # noqa: E402
from mycellm.network.quic import FrameStream, PeerLink, QuicEndpoint  # noqa: E402
from mycellm.network.service import PeerService  # noqa: E402
from mycellm.network.serving import EngineServer  # noqa: E402
from mycellm.network.session import Session  # noqa: E402
from mycellm.types import GenerationRequest, NetworkId, RequestId  # noqa: E402

FLOOD_IDENTITIES = 4  # non-member accounts for the inbound-link floods and the silent links
SILENT_LINKS = 3
HOLD_PRICE = 100_000  # micro-credits each unpaid hold states (far above what 2 tokens cost)
SILENT_HOLD_S = 10.0  # twice the hello timeout (5 s): the node must have closed them by then
INBOUND_HOLD_S = 4.0  # a flood's links are counted this long after the last connected
MAX_UNPAID = 4  # unpaid requests outstanding per target


def _raw(envelope: object) -> bytes:
    body = cbor2.dumps(envelope)
    return HEADER.pack(len(body)) + body


# Frames that break the protocol in the ways tests/test_wire.py lists (each answered, recoverably).
MALFORMED = (
    _raw({"v": wire.PROTOCOL_VERSION, "k": "teleport", "b": {}}),
    _raw({"v": 99, "k": "ping", "b": {"seq": 1, "sent_at": 0.0}}),
    _raw({"v": wire.PROTOCOL_VERSION, "k": "ping", "b": {"seq": -1, "sent_at": 0.0}}),
    _raw({"v": wire.PROTOCOL_VERSION, "k": "ping", "b": [1, 2]}),
    _raw([1, 2, 3]),
    HEADER.pack(64) + b"\xff" + os.urandom(63),
)


async def _ignore(link: PeerLink, stream: FrameStream) -> None:
    stream.reset()


class Hostile:
    """The hostile peer's service, its flood identities, and the counts of what it did and saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        root = Path(args.data_dir)
        values = {"node_name": "hostile", "data_dir": root / "peer", "host": "127.0.0.1", "quic_port": 0}
        values |= {"models": (), "bootstrap_peers": (args.bootstrap,), "reconnect_max_backoff_s": 2.0}
        # Its pings queue behind its own floods: it must not give up on a link first.
        values |= {"heartbeat_interval_s": 2.0, "heartbeat_misses": 30, "peer_exchange_interval_s": 5.0}
        settings = NodeSettings(**values)  # type: ignore[arg-type]
        self.identity = load_or_create_identity(settings.resolved_data_dir, node_name="hostile")
        self.service = PeerService(settings, self.identity, EngineServer([]))
        self.targets: dict[str, str] = dict(item.split("=", 1) for item in args.target)
        floods = [
            load_or_create_identity(root / f"flood{i}", node_name="flood") for i in range(FLOOD_IDENTITIES)
        ]
        self.flooders = [QuicEndpoint(identity, on_stream=_ignore) for identity in floods]
        self.sybils = [sybil() for _ in range(32)]
        self.sent: dict[str, Counter[str]] = {name: Counter() for name in self.targets}
        self.seen: Counter[str] = Counter()
        self.errors: list[str] = []
        self.unpaid: dict[str, set[asyncio.Task[None]]] = {name: set() for name in self.targets}
        self.background: set[asyncio.Task[None]] = set()
        self.rounds = 0
        self.seq, self.held = 0, 0  # this account's spend chain (one across its targets)

    # -- bookkeeping ------------------------------------------------------------------------------

    def linked(self) -> dict[str, Session]:
        by_address = {session.address: session for session in self.service._sessions.routed_sessions()}
        return {
            name: by_address[address]
            for name, address in self.targets.items()
            if address in by_address and not by_address[address].link.closed
        }

    def note(self, what: str, error: BaseException) -> None:
        self.seen[f"error:{what}"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{what}: {type(error).__name__}: {error}"[:300])

    def write_stats(self) -> None:
        stats = {"rounds": self.rounds, "linked": sorted(self.linked()), "errors": self.errors}
        stats |= {"sent": self.sent, "seen": self.seen}
        path = Path(self.args.stats)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(stats))
        temporary.replace(path)

    def spawn(self, work: Any, group: set[asyncio.Task[None]] | None = None) -> None:
        task = asyncio.get_running_loop().create_task(work)
        for held in (self.background, group):
            if held is not None:
                held.add(task)
                task.add_done_callback(held.discard)

    # -- one round --------------------------------------------------------------------------------

    async def round(self) -> None:
        """Every attack once on every linked target; one target also gets links it cannot keep."""
        linked = self.linked()
        for name, address in self.targets.items():
            if name not in linked:
                self.seen["not_linked"] += 1
                with contextlib.suppress(MycellmError, TimeoutError):
                    await asyncio.wait_for(self.service.connect(address), 10.0)
        for name, session in self.linked().items():
            for attack in (self.reset_flood, self.gossip_flood, self.bad_frames, self.unpaid_requests):
                try:
                    await attack(name, session)
                except Exception as error:  # a link that went away mid-attack: noted, next one
                    self.note(attack.__name__, error)
                await asyncio.sleep(0)
        name = list(self.targets)[self.rounds % len(self.targets)]
        self.spawn((self.inbound_flood if self.rounds % 2 == 0 else self.silent_links)(name))
        self.rounds += 1

    async def reset_flood(self, name: str, session: Session) -> None:
        """Streams opened with half a frame, then reset (tests/test_link_bounds.py)."""
        quic, protocol = session.link._protocol._quic, session.link._protocol
        for _ in range(self.args.resets // 50):
            opened = []
            for _ in range(50):
                if quic.get_next_available_stream_id() // 4 >= quic._remote_max_streams_bidi:
                    break  # no stream credit left: the node has not granted more yet
                stream_id = quic.get_next_available_stream_id()
                quic.send_stream_data(stream_id, HEADER.pack(100)[:3], False)
                opened.append(stream_id)
            protocol.transmit()
            await asyncio.sleep(0.005)
            for stream_id in opened:
                quic.reset_stream(stream_id, 0)
            protocol.transmit()
            self.sent[name]["reset_streams"] += len(opened)
            await asyncio.sleep(0.02)

    async def gossip_flood(self, name: str, session: Session) -> None:
        """Peer lists of bogus addresses, forged receipts, revocation lists: a third each."""
        receipts = self.forged_receipts(session)
        for index in range(self.args.gossip):
            message: wire.WireMessage
            if index % 3 == 0:
                message = wire.PeersMessage(peers=bogus_peers(self.sybils))
                kind = "peers_msgs"
            elif index % 3 == 1:
                message = wire.ReceiptsMessage(receipts=tuple(random.sample(receipts, 4)))
                kind = "receipts_msgs"
            else:
                message = wire.RevocationsMessage(lists=(os.urandom(120), revocation(garbled=True)))
                kind = "revocations_msgs"
            session.send(message)
            self.sent[name][kind] += 1
            if index % 50 == 49:
                await asyncio.sleep(0.01)
        for _ in range(self.args.valid_revocations):
            session.send(wire.RevocationsMessage(lists=(revocation(),)))
            self.sent[name]["valid_revocations"] += 1

    def forged_receipts(self, session: Session) -> list[bytes]:
        """Garbage; terms naming the victim as consumer signed by this peer's key; a foreign network
        and a price far from the table's (those two signed by this peer and a sybil account)."""
        me, sybil = self.identity, self.flooders[0].identity
        network = next(iter(session.networks), "0" * 64)
        now_ms, forged = int(time.time() * 1000), [os.urandom(180)]
        for consumer, seeder, network_id, price in (
            (session.link.certificate, me, network, 50),
            (me.certificate, sybil, os.urandom(32).hex(), 9),
            (me.certificate, sybil, network, 10**9),
        ):
            terms = ReceiptTerms(
                request_id=f"forged-{os.urandom(8).hex()}",
                network_id=network_id,
                model=BUNDLED_NAME,
                tier="tiny",
                prompt_tokens=10,
                completion_tokens=4,
                price=price,
                seeder_share=price,
                consumer=consumer.to_bytes(),
                seeder=seeder.certificate.to_bytes(),
                started_at_ms=now_ms - 2000,
                finished_at_ms=now_ms,
            ).to_bytes()
            signed = me.sign(terms)
            receipt = Receipt(
                terms=terms, consumer_signature=signed, seeder_signature=seeder.sign(terms + signed)
            )
            forged.append(receipt.to_bytes())
        return forged

    async def bad_frames(self, name: str, session: Session) -> None:
        """An oversized frame, malformed frames and a control kind on request streams; malformed
        frames on the control stream (recoverable: the session goes on)."""
        link = session.link
        huge = link.open_stream()
        link.send_raw(huge.stream_id, HEADER.pack(self.args.max_frame_bytes + 1), False)
        malformed = link.open_stream()
        link.send_raw(malformed.stream_id, b"".join(MALFORMED), False)
        wrong = link.open_stream()
        wrong.send(wire.PingMessage(seq=1, sent_at=0.0))
        for frame in MALFORMED[:3]:
            link.send_raw(session.control.stream_id, frame, False)
        self.sent[name]["bad_frames"] += 3 + len(MALFORMED) + 3
        await asyncio.gather(*(self.read(stream, 3.0, "code") for stream in (huge, malformed, wrong)))

    async def read(self, stream: FrameStream, timeout_s: float, what: str) -> None:
        """Count what ``stream`` is answered with (error codes, a done) until it ends; then reset it. A
        request stream that goes quiet is noted; the bad frames' streams go quiet after their errors."""
        try:
            for _ in range(64):
                message = await stream.receive(timeout_s)
                if message is None:
                    break
                if isinstance(message, wire.ErrorMessage | wire.DoneMessage):
                    self.seen[f"{what}:{getattr(message, 'code', 'answered')}"] += 1
        except MycellmError as error:
            if what != "code":
                self.note(what, error)
        finally:
            stream.reset()

    async def unpaid_requests(self, name: str, session: Session) -> None:
        """Requests this peer reads the answers of and never offers a receipt for."""
        network = next(iter(session.networks), None)
        while len(self.unpaid[name]) < MAX_UNPAID:
            request = GenerationRequest(
                request_id=RequestId(f"unpaid-{os.urandom(8).hex()}"),
                model=BUNDLED_NAME,
                messages=({"role": "user", "content": "Say yes."},),
                max_tokens=2,
                temperature=0,
                network_id=None if network is None else NetworkId(network),
            )
            # Every other one comes with a valid hold (an honest chain), so it is served, and the
            # seeder must count the receipt that never comes.
            hold = None
            if network is not None and self.sent[name]["unpaid_requests"] % 2:
                self.seq, held = self.seq + 1, self.held
                self.held += HOLD_PRICE
                hold = sign_spend(
                    self.identity,
                    "hold",
                    network_id=network,
                    request_id=request.request_id,
                    seeder_peer_id=session.peer_id,
                    seq=self.seq,
                    held_before=held,
                    max_price=HOLD_PRICE,
                )
            stream = session.link.open_stream()
            stream.send(wire.InferenceMessage(request=request, hold=hold))
            self.sent[name]["unpaid_requests"] += 1
            self.spawn(self.read(stream, 120.0, "unpaid"), self.unpaid[name])

    async def inbound_flood(self, name: str) -> None:
        """More links at once than the node keeps inbound; those over the cap must be closed busy."""
        host, port = split_address(self.targets[name])

        async def one(index: int) -> PeerLink | None:
            try:
                return await self.flooders[index % FLOOD_IDENTITIES].connect(host, port, 5.0)
            except MycellmError:
                self.seen["inbound_no_handshake"] += 1  # dropped at the handshake cap, or refused
                return None

        links = await asyncio.gather(*(one(index) for index in range(self.args.inbound_links)))
        self.sent[name]["inbound_links"] += self.args.inbound_links
        await asyncio.sleep(INBOUND_HOLD_S)
        reasons = [_closed_as(link) for link in links if link is not None]
        for reason in reasons:  # how many the node held at once, it says itself (/v1/node/peers)
            self.seen[f"inbound_{reason}"] += 1
        for link in links:
            if link is not None:
                link.close("flood over")

    async def silent_links(self, name: str) -> None:
        """Links that pass TLS and never open a stream: the node must close them (no hello)."""
        host, port = split_address(self.targets[name])
        links = []
        for index in range(SILENT_LINKS):
            with contextlib.suppress(MycellmError):
                links.append(await self.flooders[index].connect(host, port, 5.0))
        self.sent[name]["silent_links"] += SILENT_LINKS
        await asyncio.sleep(SILENT_HOLD_S)
        for link in links:
            self.seen[f"silent_{_closed_as(link)}"] += 1
            link.close("done")

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for endpoint in self.flooders:
            await endpoint.close()
        await self.service.stop()


def _closed_as(link: PeerLink) -> str:
    """Why the node closed ``link``: busy (at connect), no_hello (silent), other; or open."""
    reason = link.close_reason if link.closed else "open"
    return next((word.replace(" ", "_") for word in ("busy", "no hello", "open") if word in reason), "other")


async def run(args: argparse.Namespace) -> None:
    hostile = Hostile(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await hostile.service.start()
    try:
        while not stop.is_set():
            started = time.monotonic()
            await hostile.round()
            hostile.write_stats()
            wait_s = max(0.5, args.round_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait_s)
    finally:
        hostile.write_stats()
        await hostile.close()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of a node whose public network to join")
    parser.add_argument("--target", action="append", required=True, help="NAME=HOST:PORT, repeatable")
    parser.add_argument("--stats", required=True, help="JSON file of what was sent and seen")
    parser.add_argument("--round-s", type=float, default=5.0)
    parser.add_argument("--gossip", type=int, default=300, help="gossip messages per target per round")
    parser.add_argument("--valid-revocations", type=int, default=1, help="per target per round")
    parser.add_argument("--resets", type=int, default=200, help="reset streams per target per round")
    parser.add_argument("--inbound-links", type=int, default=72, help="links of one inbound flood")
    parser.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="the nodes' max_frame_bytes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="hostile %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
