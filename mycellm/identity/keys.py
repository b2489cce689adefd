"""A node's identity on disk: the account and device keys, the certificate, created or loaded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.errors import IdentityError
from mycellm.identity.certificates import (
    CERTIFICATE_MAX_BYTES,
    DEFAULT_VALIDITY_S,
    DeviceCertificate,
    issue_device_certificate,
    raw_public_key,
)
from mycellm.identity.files import (
    create_private_directory,
    load_private_key,
    private_key_pem,
    read_private,
    replace_private,
)

logger = logging.getLogger(__name__)


RENEWAL_MARGIN_S = 86400


ACCOUNT_KEY_FILE = "account.key"


DEVICE_KEY_FILE = "device.key"


CERTIFICATE_FILE = "device.cert"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The keys and certificate a node acts with; no ``account_key`` where the account lives elsewhere."""

    account_key: Ed25519PrivateKey | None
    device_key: Ed25519PrivateKey
    certificate: DeviceCertificate

    @property
    def peer_id(self) -> str:
        return self.certificate.peer_id

    @property
    def account_id(self) -> str:
        return self.certificate.account_id

    @property
    def device_public_key(self) -> bytes:
        return raw_public_key(self.device_key)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the device key."""
        return self.device_key.sign(data)


def load_certificate_file(path: Path) -> DeviceCertificate:
    data = read_private(path, CERTIFICATE_MAX_BYTES)
    try:
        return DeviceCertificate.from_bytes(data)
    except IdentityError as error:
        raise IdentityError(f"{path}: {error.message}") from error


def _create_identity(directory: Path, node_name: str, validity_s: int, now: float | None) -> NodeIdentity:
    account_key = Ed25519PrivateKey.generate()
    device_key = Ed25519PrivateKey.generate()
    certificate = issue_device_certificate(
        account_key, raw_public_key(device_key), name=node_name, validity_s=validity_s, now=now
    )
    create_private_directory(
        directory,
        {
            ACCOUNT_KEY_FILE: private_key_pem(account_key),
            DEVICE_KEY_FILE: private_key_pem(device_key),
            CERTIFICATE_FILE: certificate.to_bytes(),
        },
    )
    logger.info("created identity %s (peer %s) in %s", certificate.account_id, certificate.peer_id, directory)
    return NodeIdentity(account_key=account_key, device_key=device_key, certificate=certificate)


def replace_certificate_file(path: Path, certificate: DeviceCertificate) -> None:
    replace_private(path, certificate.to_bytes())


def load_or_create_identity(
    data_dir: Path,
    *,
    node_name: str,
    validity_s: int = DEFAULT_VALIDITY_S,
    now: float | None = None,
) -> NodeIdentity:
    """Load ``data_dir/identity``, creating it on first use and renewing a lapsing certificate."""
    directory = Path(data_dir) / "identity"
    account_path = directory / ACCOUNT_KEY_FILE
    device_path = directory / DEVICE_KEY_FILE
    certificate_path = directory / CERTIFICATE_FILE
    try:
        present = {path: path.exists() for path in (account_path, device_path, certificate_path)}
    except OSError as error:
        raise IdentityError(f"cannot look into {directory}: {error}") from error
    if not any(present.values()):
        return _create_identity(directory, node_name, validity_s, now)
    missing = [path.name for path in (device_path, certificate_path) if not present[path]]
    if missing:
        raise IdentityError(
            f"identity in {directory} is incomplete: {', '.join(missing)} missing; "
            "restore it or remove the directory to create a new identity"
        )

    account_key = load_private_key(account_path) if present[account_path] else None
    device_key = load_private_key(device_path)
    certificate = load_certificate_file(certificate_path)
    if certificate.device_public_key != raw_public_key(device_key):
        raise IdentityError(f"{device_path} does not hold the device key certified by {certificate_path}")
    if account_key is not None and certificate.account_public_key != raw_public_key(account_key):
        raise IdentityError(f"{certificate_path} is not signed for the account key in {account_path}")

    now = time.time() if now is None else now
    renewing = account_key is not None and certificate.expires_at - now <= RENEWAL_MARGIN_S
    try:
        # A lapsing certificate is renewed, so only its signature must still hold.
        if renewing:
            certificate.verify_signature()
        else:
            certificate.verify(now=now)
    except IdentityError as error:
        raise IdentityError(f"{certificate_path}: {error.message}") from error
    if renewing and account_key is not None:
        certificate = issue_device_certificate(
            account_key,
            certificate.device_public_key,
            name=certificate.name,
            role=certificate.role,
            validity_s=validity_s,
            now=now,
        )
        replace_certificate_file(certificate_path, certificate)
        logger.info("renewed %s until %d", certificate_path, certificate.expires_at)
    return NodeIdentity(account_key=account_key, device_key=device_key, certificate=certificate)
