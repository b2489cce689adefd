"""TLS certificates of a node: self-signed with the device key, carrying the device certificate."""

from __future__ import annotations

import datetime

from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from mycellm.errors import IdentityError
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.keys import NodeIdentity

# 2.25.<uuid>: an OID that needs no registration (ITU-T X.667); holds the CBOR device certificate.
DEVICE_CERTIFICATE_OID = x509.ObjectIdentifier("2.25.226405873405232907463316624575412934913")


def tls_certificate(identity: NodeIdentity) -> x509.Certificate:
    """A self-signed X.509 certificate for the device key, carrying the device certificate."""
    device = identity.certificate
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device.peer_id[:64])])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(device.issued_at, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(device.expires_at, datetime.UTC))
        .add_extension(x509.UnrecognizedExtension(DEVICE_CERTIFICATE_OID, device.to_bytes()), critical=False)
        .sign(identity.device_key, algorithm=None)
    )


def peer_certificate(certificate: x509.Certificate | None, now: float | None = None) -> DeviceCertificate:
    """The device certificate a TLS certificate stands for; IdentityError when it does not hold."""
    if certificate is None:
        raise IdentityError("the peer presented no certificate")
    try:
        extension = certificate.extensions.get_extension_for_oid(DEVICE_CERTIFICATE_OID)
    except x509.ExtensionNotFound as error:
        raise IdentityError("the peer's certificate carries no device certificate") from error
    except ValueError as error:
        raise IdentityError(f"the peer's certificate extensions are malformed: {error}") from error
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise IdentityError("the peer's device certificate extension is malformed")
    device = DeviceCertificate.from_bytes(value.value)
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"the peer's TLS key is {type(key).__name__}, not Ed25519")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if raw != device.device_public_key:
        raise IdentityError("the peer's TLS key is not the device key of its device certificate")
    device.verify(now=now)
    return device


def request_client_certificate(quic: QuicConnection) -> None:
    """aioquic's private switch: make a server connection ask for (and so receive) the client's
    certificate (aioquic 1.7, pinned, neither asks nor refuses a client that sends none)."""
    initialize = quic._initialize

    def initialize_requesting_certificate(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize_requesting_certificate  # type: ignore[method-assign]
