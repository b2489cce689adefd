"""Devices of an account: certifying new devices, listing them, and the signed list of revoked ones."""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mycellm import identity
from mycellm.errors import IdentityError
from mycellm.identity import (
    ACCOUNT_KEY_FILE,
    CERTIFICATE_FILE,
    DEFAULT_VALIDITY_S,
    DEVICE_KEY_FILE,
    DeviceCertificate,
    NodeIdentity,
    RawPublicKey,
    Role,
    issue_device_certificate,
    load_or_create_identity,
)

REVOCATION_LIST_VERSION = 1
REVOCATION_LIST_MAX_BYTES = 65536
REVOCATION_BOOK_MAX_BYTES = 16 * 1024 * 1024
REVOCATIONS_FILE = "revocations.cbor"  # in <data_dir>/identity/
DEVICES_DIR = "devices"  # <data_dir>/identity/devices/<peer_id>.cert: certificates this account issued
PEER_ID_PREFIX_MIN_CHARS = 8


class RevocationList(identity.CanonicalModel):
    """An account key's signed, numbered list of the device keys it no longer vouches for."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = REVOCATION_LIST_VERSION
    account_public_key: RawPublicKey
    serial: Annotated[int, Field(ge=0)]
    issued_at: Annotated[int, Field(ge=0)]
    revoked: tuple[RawPublicKey, ...]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    @field_validator("revoked")
    @classmethod
    def _check_sorted_and_unique(cls, revoked: tuple[bytes, ...]) -> tuple[bytes, ...]:
        # One order only, so that one set of keys has one signed encoding and lookups can bisect.
        if any(later <= earlier for earlier, later in pairwise(revoked)):
            raise ValueError("revoked device keys must be sorted and without duplicates")
        return revoked

    def signed_payload(self) -> bytes:
        """Canonical CBOR of every field but the signature: the bytes the account key signs."""
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse a revocation list; checks the size cap before decoding. Does not verify the signature."""
        return cls.parse_canonical(
            data,
            what="revocation list",
            max_bytes=REVOCATION_LIST_MAX_BYTES,
            version=REVOCATION_LIST_VERSION,
            tuples=("revoked",),
        )

    def verify(self) -> None:
        """Check that the account key signed this list; raises IdentityError if not."""
        try:
            account_key = Ed25519PublicKey.from_public_bytes(self.account_public_key)
            account_key.verify(self.signature, self.signed_payload())
        except (InvalidSignature, ValueError) as error:
            raise IdentityError(
                f"revocation list signature does not verify against account {self.account_id}"
            ) from error

    def is_revoked(self, device_public_key: bytes) -> bool:
        """Whether this list revokes ``device_public_key`` (raw 32 bytes)."""
        index = bisect.bisect_left(self.revoked, device_public_key)
        return index < len(self.revoked) and self.revoked[index] == device_public_key

    @property
    def account_id(self) -> str:
        return hashlib.sha256(self.account_public_key).hexdigest()


def issue_revocation_list(
    account_key: Ed25519PrivateKey, revoked: Iterable[bytes], *, serial: int, now: float | None = None
) -> RevocationList:
    """Sign a list revoking the device keys ``revoked`` (any order, duplicates dropped) as ``serial``."""
    fields = {
        "version": REVOCATION_LIST_VERSION,
        "account_public_key": identity._raw_public_key(account_key),
        "serial": serial,
        "issued_at": int(time.time() if now is None else now),
        "revoked": tuple(sorted(set(revoked))),
        "signature": bytes(64),
    }
    try:
        unsigned = RevocationList.model_validate(fields)
    except ValidationError as error:
        raise IdentityError(f"cannot issue a revocation list: {identity._describe(error)}") from error
    signed = unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})
    if (size := len(signed.to_bytes())) > REVOCATION_LIST_MAX_BYTES:
        raise IdentityError(f"revocation list is {size} bytes, over the {REVOCATION_LIST_MAX_BYTES}-byte cap")
    return signed


class RevocationBook:
    """Latest verified revocation list per account, as a node knows them (in memory, persisted by the caller with to_bytes/from_bytes)."""

    def __init__(self, lists: Iterable[RevocationList] = ()) -> None:
        self._lists: dict[bytes, RevocationList] = {}
        for revocations in lists:
            self.accept(revocations)

    def accept(self, revocations: RevocationList) -> bool:
        """Store a verified list if it is newer than the one held for its account; True if stored."""
        revocations.verify()
        held = self._lists.get(revocations.account_public_key)
        if held is not None and revocations.serial <= held.serial:
            return False
        self._lists[revocations.account_public_key] = revocations
        return True

    def is_revoked(self, certificate: DeviceCertificate) -> bool:
        """Whether the certificate's own account has revoked the certificate's device key."""
        revocations = self._lists.get(certificate.account_public_key)
        return revocations is not None and revocations.is_revoked(certificate.device_public_key)

    def lists(self) -> list[RevocationList]:
        """The lists held, one per account, ordered by account public key."""
        return [self._lists[account] for account in sorted(self._lists)]

    def to_bytes(self) -> bytes:
        """A canonical CBOR array of each list's own encoding."""
        return cbor2.dumps([revocations.to_bytes() for revocations in self.lists()], canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationBook:
        """Parse and re-verify a book; checks the size cap before decoding; raises IdentityError."""
        decoded = identity.decode_cbor("revocation book", data, REVOCATION_BOOK_MAX_BYTES, max_depth=2)
        if not isinstance(decoded, list) or not all(isinstance(item, bytes) for item in decoded):
            raise IdentityError("revocation book is not a CBOR array of encoded revocation lists")
        book = cls()
        for index, item in enumerate(decoded):
            try:
                revocations = RevocationList.from_bytes(item)
                if revocations.account_public_key in book._lists:
                    raise IdentityError(f"a second list for account {revocations.account_id}")
                book.accept(revocations)
            except IdentityError as error:
                raise IdentityError(f"revocation book entry {index}: {error.message}") from error
        return book


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
        certificate = identity._load_certificate(path)
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


def _replace_private(path: Path, data: bytes) -> None:
    try:
        # mkstemp opens with O_EXCL and mode 0600; os.replace swaps the file in atomically.
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            identity._write_private(Path(temporary), data, descriptor)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        identity._sync_directory(path.parent)
    except OSError as error:
        raise IdentityError(f"cannot write {path}: {error}") from error


def _write_device_identity(directory: Path, key: Ed25519PrivateKey, certificate: DeviceCertificate) -> None:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Both files appear at once by renaming a finished staging directory (mkdtemp: 0700).
        staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=directory.parent))
        try:
            identity._write_private(staging / DEVICE_KEY_FILE, identity._pem(key))
            identity._write_private(staging / CERTIFICATE_FILE, certificate.to_bytes())
            os.chmod(staging, 0o700)
            identity._sync_directory(staging)
            os.rename(staging, directory)
            identity._sync_directory(directory.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise IdentityError(f"cannot create identity files in {directory}: {error}") from error


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
    public_key = identity._raw_public_key(device_key)
    certificate = issue_device_certificate(
        account_key, public_key, name=name, role=role, validity_s=validity_s, now=now
    )
    # Recorded first, so that no device exists that this account cannot find to revoke.
    record_path = _identity_dir(data_dir) / DEVICES_DIR / f"{certificate.peer_id}.cert"
    try:
        record_path.parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise IdentityError(f"cannot create {record_path.parent}: {error}") from error
    identity._replace_certificate(record_path, certificate)
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
    _replace_private(_identity_dir(data_dir) / REVOCATIONS_FILE, revocations.to_bytes())
    return revocations


def load_revocation_list(data_dir: Path) -> RevocationList | None:
    """Read and verify ``data_dir/identity/revocations.cbor``; None if there is none."""
    path = _identity_dir(data_dir) / REVOCATIONS_FILE
    if not os.path.lexists(path):
        return None
    data = identity._read_private(path, REVOCATION_LIST_MAX_BYTES)
    try:
        revocations = RevocationList.from_bytes(data)
        revocations.verify()
    except IdentityError as error:
        raise IdentityError(f"{path}: {error.message}") from error
    return revocations
