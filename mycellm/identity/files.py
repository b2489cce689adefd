"""Secret files: written once with mode 0600, read only when nobody else can read them."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mycellm.errors import IdentityError

logger = logging.getLogger(__name__)


KEY_FILE_MAX_BYTES = 16384


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes, descriptor: int | None = None) -> None:
    # O_EXCL with mode 0600: the file never exists with wider permissions, and nothing is overwritten.
    if descriptor is None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_private(path: Path, max_bytes: int) -> bytes:
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


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = read_private(path, KEY_FILE_MAX_BYTES)
    if len(data) > KEY_FILE_MAX_BYTES:
        raise IdentityError(f"{path} is over {KEY_FILE_MAX_BYTES} bytes: not a key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise IdentityError(f"{path} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def create_private_directory(directory: Path, files: dict[str, bytes]) -> None:
    """Create ``directory`` holding ``files`` (each 0600), all at once or not at all.

    The files are written into a staging directory (mkdtemp: 0700) beside it, synced, and the
    staging directory is renamed into place, so a crash never leaves a partial identity.
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=directory.parent))
        try:
            for name, data in files.items():
                write_private(staging / name, data)
            os.chmod(staging, 0o700)
            sync_directory(staging)
            os.rename(staging, directory)
            sync_directory(directory.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise IdentityError(f"cannot create identity files in {directory}: {error}") from error


def replace_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600), replacing what was there in one atomic step."""
    try:
        # mkstemp opens with O_EXCL and mode 0600; os.replace swaps the file in atomically.
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            write_private(Path(temporary), data, descriptor)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        sync_directory(path.parent)
    except OSError as error:
        raise IdentityError(f"cannot write {path}: {error}") from error
