"""Helpers for peer-link tests: PeerServices on loopback, and TLS certificates crafted to be refused."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from mycellm.config import NodeSettings
from mycellm.engines.base import InferenceEngine
from mycellm.forwarding import EngineServer
from mycellm.identity import load_or_create_identity
from mycellm.peers import PeerService
from mycellm.settlement import CreditKeeper
from mycellm.transport.certificates import DEVICE_CERTIFICATE_OID
from mycellm.wire import ALPN


def peer_service(
    root: Path,
    name: str,
    engines: list[InferenceEngine] | None = None,
    keeper: CreditKeeper | None = None,
    **settings: object,
) -> PeerService:
    values: dict[str, object] = {
        "node_name": name,
        "data_dir": root / name,
        "host": "127.0.0.1",
        "quic_port": 0,
        "models": (),
        "heartbeat_interval_s": 0.2,
        "reconnect_max_backoff_s": 0.5,
        "peer_exchange_interval_s": 0.5,
    }
    values.update(settings)
    node = NodeSettings(**values)  # type: ignore[arg-type]
    identity = load_or_create_identity(node.resolved_data_dir, node_name=name)
    return PeerService(node, identity, EngineServer(list(engines or [])), keeper=keeper)


async def wait_for(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def crafted_certificate(key: Ed25519PrivateKey, device_certificate: bytes | None) -> x509.Certificate:
    """A self-signed certificate for ``key``, carrying ``device_certificate`` bytes if given."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if device_certificate is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(DEVICE_CERTIFICATE_OID, device_certificate), critical=False
        )
    return builder.sign(key, algorithm=None)


async def refusal_reason(
    port: int, certificate: x509.Certificate | None, key: Ed25519PrivateKey | None
) -> str:
    """Connect with a raw aioquic client presenting ``certificate``; the server's close reason."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    if certificate is not None:
        configuration.certificate = certificate
        configuration.private_key = key
    async with connect("127.0.0.1", port, configuration=configuration) as protocol:
        client: QuicConnectionProtocol = protocol
        await asyncio.wait_for(client.wait_closed(), timeout=5.0)
        event = client._quic._close_event
        assert event is not None
        return event.reason_phrase
