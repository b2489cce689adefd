"""Devices of an account: certifying new devices, listing them and revoking them."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from mycellm.errors import IdentityError
from mycellm.identity.certificates import (
    DEFAULT_VALIDITY_S,
    DeviceCertificate,
    Role,
    issue_device_certificate,
    raw_public_key,
)
from mycellm.identity.files import (
    create_private_directory,
    private_key_pem,
    read_private,
    replace_private,
)
from mycellm.identity.keys import (
    ACCOUNT_KEY_FILE,
    CERTIFICATE_FILE,
    DEVICE_KEY_FILE,
    NodeIdentity,
    load_certificate_file,
    load_or_create_identity,
    replace_certificate_file,
)
from mycellm.identity.revocations import (
    REVOCATION_LIST_MAX_BYTES,
    RevocationList,
    issue_revocation_list,
)

REVOCATIONS_FILE = "revocations.cbor"  # in <data_dir>/identity/


DEVICES_DIR = "devices"  # <data_dir>/identity/devices/<peer_id>.cert: certificates this account issued


PEER_ID_PREFIX_MIN_CHARS = 8


class DeviceRecord(BaseModel):
    """A device certified by this node's account, as ``list_devices`` reports it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    certificate: DeviceCertificate
    revoked: bool
    own: bool


def _identity_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "identity"


def _load_own(data_dir: Path, now: float | None) -> NodeIdentity:
    directory = _identity_dir(data_dir)
    names = (ACCOUNT_KEY_FILE, DEVICE_KEY_FILE, CERTIFICATE_FILE)
    if not any(os.path.lexists(directory / name) for name in names):
        raise IdentityError(
            f"no identity in {directory}: run `mycellm account show --data-dir {data_dir}` to create one"
        )
    # An identity exists, so nothing is created and the name is never used.
    return load_or_create_identity(data_dir, node_name="unused", now=now)


def _load_account(data_dir: Path, now: float | None) -> tuple[NodeIdentity, Ed25519PrivateKey]:
    own = _load_own(data_dir, now)
    if own.account_key is None:
        raise IdentityError(
            f"{_identity_dir(data_dir)} holds no {ACCOUNT_KEY_FILE}: devices are added and revoked "
            "on the node that holds the account key"
        )
    return own, own.account_key


def _own_revocations(data_dir: Path, own: DeviceCertificate) -> RevocationList | None:
    revocations = load_revocation_list(data_dir)
    if revocations is not None and revocations.account_public_key != own.account_public_key:
        path = _identity_dir(data_dir) / REVOCATIONS_FILE
        raise IdentityError(f"{path} is signed by account {revocations.account_id}, not this node's account")
    return revocations


def _recorded(data_dir: Path, own: DeviceCertificate) -> list[DeviceCertificate]:
    directory = _identity_dir(data_dir) / DEVICES_DIR
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".cert") and name[0] != ".")
    except FileNotFoundError:
        return []
    except OSError as error:
        raise IdentityError(f"cannot list {directory}: {error}") from error
    certificates = []
    for name in names:
        path = directory / name
        certificate = load_certificate_file(path)
        if certificate.peer_id != path.stem:
            raise IdentityError(f"{path} holds the certificate of another peer, {certificate.peer_id}")
        try:
            if certificate.account_public_key != own.account_public_key:
                raise IdentityError(f"certified by account {certificate.account_id}, not this node's")
            certificate.verify_signature()
        except IdentityError as error:
            raise IdentityError(f"{path}: {error.message}") from error
        if certificate.peer_id != own.peer_id:
            certificates.append(certificate)
    return sorted(certificates, key=lambda certificate: (certificate.issued_at, certificate.peer_id))


def _records(data_dir: Path, own: DeviceCertificate) -> list[DeviceRecord]:
    revocations = _own_revocations(data_dir, own)

    def record(certificate: DeviceCertificate, own: bool) -> DeviceRecord:
        revoked = revocations is not None and revocations.is_revoked(certificate.device_public_key)
        return DeviceRecord(certificate=certificate, revoked=revoked, own=own)

    return [record(own, True)] + [record(certificate, False) for certificate in _recorded(data_dir, own)]


def _write_device_identity(directory: Path, key: Ed25519PrivateKey, certificate: DeviceCertificate) -> None:
    create_private_directory(
        directory, {DEVICE_KEY_FILE: private_key_pem(key), CERTIFICATE_FILE: certificate.to_bytes()}
    )


def add_device(
    data_dir: Path,
    name: str,
    out_dir: Path,
    *,
    role: Role = "node",
    validity_s: int = DEFAULT_VALIDITY_S,
    now: float | None = None,
) -> DeviceCertificate:
    """Certify a new device key with the account in ``data_dir`` and write its identity to ``out_dir``."""
    own, account_key = _load_account(data_dir, now)
    target = _identity_dir(out_dir)
    if os.path.lexists(target):
        raise IdentityError(f"{target} already exists: refusing to overwrite an identity")
    active = {record.certificate.name for record in _records(data_dir, own.certificate) if not record.revoked}
    if name in active:
        raise IdentityError(f"device name {name!r} is taken by a device of this account; choose another")
    device_key = Ed25519PrivateKey.generate()
    public_key = raw_public_key(device_key)
    certificate = issue_device_certificate(
        account_key, public_key, name=name, role=role, validity_s=validity_s, now=now
    )
    # Recorded first, so that no device exists that this account cannot find to revoke.
    record_path = _identity_dir(data_dir) / DEVICES_DIR / f"{certificate.peer_id}.cert"
    try:
        record_path.parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise IdentityError(f"cannot create {record_path.parent}: {error}") from error
    replace_certificate_file(record_path, certificate)
    try:
        _write_device_identity(target, device_key, certificate)
    except BaseException:
        record_path.unlink(missing_ok=True)
        raise
    return certificate


def list_devices(data_dir: Path, *, now: float | None = None) -> list[DeviceRecord]:
    """This node's own device, then every device its account recorded, each marked revoked or not."""
    return _records(data_dir, _load_own(data_dir, now).certificate)


def _resolve(device: str, records: list[DeviceRecord]) -> DeviceRecord:
    prefix = device.lower()
    by_peer_id = len(prefix) >= PEER_ID_PREFIX_MIN_CHARS and set(prefix) <= set("0123456789abcdef")
    matches = [
        record
        for record in records
        if record.certificate.name == device or (by_peer_id and record.certificate.peer_id.startswith(prefix))
    ]
    if not matches:
        raise IdentityError(
            f"no device of this account is named {device!r} or has a peer id starting with it "
            f"(a peer id prefix needs at least {PEER_ID_PREFIX_MIN_CHARS} hex characters)"
        )
    if len(matches) > 1:
        found = ", ".join(
            f"{record.certificate.name} ({record.certificate.peer_id[:16]})" for record in matches
        )
        raise IdentityError(f"{device!r} is ambiguous, it matches {found}: give more of the peer id")
    return matches[0]


def revoke_device(data_dir: Path, device: str, *, now: float | None = None) -> RevocationList:
    """Revoke a device of this account by name or peer id (prefix) and write the new signed list."""
    own, account_key = _load_account(data_dir, now)
    target = _resolve(device, _records(data_dir, own.certificate))
    if target.own:
        peer = target.certificate.peer_id[:16]
        raise IdentityError(f"refusing to revoke this node's own device {peer}: it holds the account key")
    current = _own_revocations(data_dir, own.certificate)
    if current is not None and target.revoked:
        return current
    revoked = (*(current.revoked if current else ()), target.certificate.device_public_key)
    serial = current.serial + 1 if current else 1
    revocations = issue_revocation_list(account_key, revoked, serial=serial, now=now)
    replace_private(_identity_dir(data_dir) / REVOCATIONS_FILE, revocations.to_bytes())
    return revocations


def load_revocation_list(data_dir: Path) -> RevocationList | None:
    """Read and verify ``data_dir/identity/revocations.cbor``; None if there is none."""
    path = _identity_dir(data_dir) / REVOCATIONS_FILE
    if not os.path.lexists(path):
        return None
    data = read_private(path, REVOCATION_LIST_MAX_BYTES)
    try:
        revocations = RevocationList.from_bytes(data)
        revocations.verify()
    except IdentityError as error:
        raise IdentityError(f"{path}: {error.message}") from error
    return revocations
