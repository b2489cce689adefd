"""Node identity: the Ed25519 account key, the device certificate it signs, the peer id and their files."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import cbor2
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mycellm.errors import IdentityError

logger = logging.getLogger(__name__)

CERTIFICATE_VERSION = 1
CERTIFICATE_MAX_BYTES = 4096
KEY_FILE_MAX_BYTES = 16384
DEFAULT_VALIDITY_S = 365 * 86400
RENEWAL_MARGIN_S = 86400
ACCOUNT_KEY_FILE = "account.key"
DEVICE_KEY_FILE = "device.key"
CERTIFICATE_FILE = "device.cert"

Role = Literal["node", "bootstrap", "client"]
RawPublicKey = Annotated[bytes, Field(min_length=32, max_length=32)]


def peer_id_for(device_public_key: bytes) -> str:
    """The peer id of a device: SHA-256 (hex) of its raw 32-byte Ed25519 public key."""
    if len(device_public_key) != 32:
        raise IdentityError(f"a device public key is 32 raw bytes, not {len(device_public_key)}")
    return hashlib.sha256(device_public_key).hexdigest()


def _raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())


def decode_cbor(what: str, data: bytes, max_bytes: int, max_depth: int) -> Any:
    """CBOR ``data`` after checking the size cap; IdentityError naming ``what`` if it is not CBOR."""
    if len(data) > max_bytes:
        raise IdentityError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte cap")
    try:
        return cbor2.loads(data, max_depth=max_depth, allow_duplicate_keys=False)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as error:
        raise IdentityError(f"{what} is not valid CBOR: {error}") from error


SignedModel = TypeVar("SignedModel", bound="CanonicalModel")


class CanonicalModel(BaseModel):
    """A signed value stored as a canonical CBOR map of exactly its fields."""

    def to_bytes(self) -> bytes:
        """Canonical CBOR map of every field, signature included."""
        return cbor2.dumps(self.model_dump(), canonical=True)

    @classmethod
    def parse_canonical(
        cls: type[SignedModel],
        data: bytes,
        *,
        what: str,
        max_bytes: int,
        version: int,
        tuples: tuple[str, ...] = (),
    ) -> SignedModel:
        """Strict parse: size cap before decoding, exact fields, version, one encoding only."""
        decoded = decode_cbor(what, data, max_bytes, max_depth=4)
        if not isinstance(decoded, dict):
            raise IdentityError(f"{what} is not a CBOR map but {type(decoded).__name__}")
        expected = set(cls.model_fields)
        missing = sorted(expected - decoded.keys())
        extra = sorted(repr(key) for key in decoded.keys() - expected)
        if missing:
            raise IdentityError(f"{what} lacks field(s): {', '.join(missing)}")
        if extra:
            raise IdentityError(f"{what} has unexpected field(s): {', '.join(extra)}")
        if decoded["version"] != version or type(decoded["version"]) is not int:
            raise IdentityError(f"{what} version {decoded['version']!r} is not supported")
        for name in tuples:
            if isinstance(decoded[name], list):
                decoded[name] = tuple(decoded[name])  # CBOR arrays decode as lists
        try:
            parsed = cls.model_validate(decoded)
        except ValidationError as error:
            raise IdentityError(f"{what} is malformed: {_describe(error)}") from error
        # Signed bytes must have one encoding only; this also rejects trailing bytes.
        if parsed.to_bytes() != data:
            raise IdentityError(f"{what} is not in canonical CBOR encoding")
        return parsed


class DeviceCertificate(CanonicalModel):
    """An account key's statement that a device key belongs to it, for a role, name and time span."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: int = CERTIFICATE_VERSION
    account_public_key: RawPublicKey
    device_public_key: RawPublicKey
    role: Role
    name: Annotated[str, Field(min_length=1, max_length=64)]
    issued_at: Annotated[int, Field(ge=0)]
    expires_at: Annotated[int, Field(ge=0)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    def signed_payload(self) -> bytes:
        """Canonical CBOR of every field but the signature: the bytes the account key signs."""
        return cbor2.dumps(self.model_dump(exclude={"signature"}), canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceCertificate:
        """Parse a certificate; checks the size cap before decoding. Does not verify the signature."""
        return cls.parse_canonical(
            data, what="device certificate", max_bytes=CERTIFICATE_MAX_BYTES, version=CERTIFICATE_VERSION
        )

    def verify_signature(self) -> None:
        """Check that the account key signed this certificate; raises IdentityError if not."""
        try:
            account_key = Ed25519PublicKey.from_public_bytes(self.account_public_key)
            account_key.verify(self.signature, self.signed_payload())
        except (InvalidSignature, ValueError) as error:
            raise IdentityError(
                f"device certificate signature does not verify against account {self.account_id}"
            ) from error

    def verify(
        self, now: float | None = None, clock_skew_s: float = 300, *, signature_checked: bool = False
    ) -> None:
        """Check the signature and the validity period at ``now``; raises IdentityError if either fails.

        ``signature_checked``: the caller already verified this very certificate's signature.
        """
        if not signature_checked:
            self.verify_signature()
        now = time.time() if now is None else now
        if self.expires_at <= self.issued_at:
            raise IdentityError(
                f"device certificate expires ({self.expires_at}) before it is issued ({self.issued_at})"
            )
        if self.issued_at > now + clock_skew_s:
            raise IdentityError(
                f"device certificate is issued in the future ({self.issued_at}, now {int(now)})"
            )
        if now >= self.expires_at:
            raise IdentityError(f"device certificate expired at {self.expires_at} (now {int(now)})")

    @property
    def peer_id(self) -> str:
        return peer_id_for(self.device_public_key)

    @property
    def account_id(self) -> str:
        return hashlib.sha256(self.account_public_key).hexdigest()


def issue_device_certificate(
    account_key: Ed25519PrivateKey,
    device_public_key: bytes,
    *,
    name: str,
    role: Role = "node",
    validity_s: int = DEFAULT_VALIDITY_S,
    now: float | None = None,
) -> DeviceCertificate:
    """Sign a certificate with ``account_key`` binding ``device_public_key`` from now for validity_s."""
    if validity_s <= 0:
        raise IdentityError(f"certificate validity must be positive, not {validity_s} s")
    issued_at = int(time.time() if now is None else now)
    fields = {
        "version": CERTIFICATE_VERSION,
        "account_public_key": _raw_public_key(account_key),
        "device_public_key": device_public_key,
        "role": role,
        "name": name,
        "issued_at": issued_at,
        "expires_at": issued_at + validity_s,
    }
    try:
        unsigned = DeviceCertificate.model_validate({**fields, "signature": bytes(64)})
    except ValidationError as error:
        raise IdentityError(f"cannot issue a device certificate: {_describe(error)}") from error
    return unsigned.model_copy(update={"signature": account_key.sign(unsigned.signed_payload())})


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
        return _raw_public_key(self.device_key)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the device key."""
        return self.device_key.sign(data)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes, descriptor: int | None = None) -> None:
    # O_EXCL with mode 0600: the file never exists with wider permissions, and nothing is overwritten.
    if descriptor is None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_private(path: Path, max_bytes: int) -> bytes:
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise IdentityError(f"{path} is not a regular file")
        mode = stat.S_IMODE(status.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise IdentityError(
                f"permissions {mode:04o} for {path} are too open: it must not be accessible by "
                f"group or others (chmod 600 {path})"
            )
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as error:
        raise IdentityError(f"cannot read {path}: {error.strerror or error}") from error


def _load_key(path: Path) -> Ed25519PrivateKey:
    data = _read_private(path, KEY_FILE_MAX_BYTES)
    if len(data) > KEY_FILE_MAX_BYTES:
        raise IdentityError(f"{path} is over {KEY_FILE_MAX_BYTES} bytes: not a key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise IdentityError(f"{path} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def _load_certificate(path: Path) -> DeviceCertificate:
    data = _read_private(path, CERTIFICATE_MAX_BYTES)
    try:
        return DeviceCertificate.from_bytes(data)
    except IdentityError as error:
        raise IdentityError(f"{path}: {error.message}") from error


def _create_identity(directory: Path, node_name: str, validity_s: int, now: float | None) -> NodeIdentity:
    account_key = Ed25519PrivateKey.generate()
    device_key = Ed25519PrivateKey.generate()
    certificate = issue_device_certificate(
        account_key, _raw_public_key(device_key), name=node_name, validity_s=validity_s, now=now
    )
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # All three files appear at once by renaming a finished staging directory (mkdtemp: 0700).
        staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=directory.parent))
        try:
            _write_private(staging / ACCOUNT_KEY_FILE, _pem(account_key))
            _write_private(staging / DEVICE_KEY_FILE, _pem(device_key))
            _write_private(staging / CERTIFICATE_FILE, certificate.to_bytes())
            os.chmod(staging, 0o700)
            _sync_directory(staging)
            os.rename(staging, directory)
            _sync_directory(directory.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise IdentityError(f"cannot create identity files in {directory}: {error}") from error
    logger.info("created identity %s (peer %s) in %s", certificate.account_id, certificate.peer_id, directory)
    return NodeIdentity(account_key=account_key, device_key=device_key, certificate=certificate)


def _replace_certificate(path: Path, certificate: DeviceCertificate) -> None:
    try:
        # mkstemp opens with O_EXCL and mode 0600; os.replace swaps the file in atomically.
        descriptor, temporary = tempfile.mkstemp(prefix=".device.cert-", dir=path.parent)
        try:
            _write_private(Path(temporary), certificate.to_bytes(), descriptor)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        _sync_directory(path.parent)
    except OSError as error:
        raise IdentityError(f"cannot rewrite {path}: {error}") from error


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

    account_key = _load_key(account_path) if present[account_path] else None
    device_key = _load_key(device_path)
    certificate = _load_certificate(certificate_path)
    if certificate.device_public_key != _raw_public_key(device_key):
        raise IdentityError(f"{device_path} does not hold the device key certified by {certificate_path}")
    if account_key is not None and certificate.account_public_key != _raw_public_key(account_key):
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
        _replace_certificate(certificate_path, certificate)
        logger.info("renewed %s until %d", certificate_path, certificate.expires_at)
    return NodeIdentity(account_key=account_key, device_key=device_key, certificate=certificate)
