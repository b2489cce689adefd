"""The revocation lists a node knows: its own account's (watched on disk) and those peers published."""

from __future__ import annotations

import logging
from pathlib import Path

from mycellm.errors import IdentityError
from mycellm.identity.certificates import DeviceCertificate
from mycellm.identity.devices import REVOCATIONS_FILE, load_revocation_list
from mycellm.identity.revocations import RevocationBook, RevocationList

logger = logging.getLogger(__name__)


KNOWN_REVOCATIONS_FILE = "known-revocations.cbor"


class RevocationKeeper:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._path = data_dir / KNOWN_REVOCATIONS_FILE
        self._own_mtime: float | None = None
        self.book = RevocationBook()
        try:
            if self._path.exists():
                self.book = RevocationBook.from_bytes(self._path.read_bytes())
        except (OSError, IdentityError) as error:
            # Fail closed: starting with an empty book would accept every device it revoked.
            message = error.message if isinstance(error, IdentityError) else str(error)
            raise IdentityError(
                f"cannot read the revocations this node knew ({self._path}): {message}; "
                "move the file away to start without them"
            ) from error

    def is_revoked(self, certificate: DeviceCertificate) -> bool:
        return self.book.is_revoked(certificate)

    def lists(self) -> list[RevocationList]:
        return self.book.lists()

    def refresh_own(self) -> list[RevocationList]:
        """Take in this account's list when its file changed (``mycellm device revoke``)."""
        path = self._data_dir / "identity" / REVOCATIONS_FILE
        try:
            mtime = path.stat().st_mtime if path.exists() else None
            if mtime is None or mtime == self._own_mtime:
                return []
            self._own_mtime = mtime
            own = load_revocation_list(self._data_dir)
        except (OSError, IdentityError) as error:
            logger.warning("cannot read this account's revocations: %s", error)
            return []
        return self.accept((own.to_bytes(),), source=None, own=True) if own is not None else []

    def accept(
        self, encoded: tuple[bytes, ...], source: str | None, *, own: bool = False
    ) -> list[RevocationList]:
        """Verify and keep the lists newer than what the book holds; returns those (saved to disk).

        Over the book's cap a peer's list is refused (logged); this account's own (``own``) is kept.
        """
        accepted: list[RevocationList] = []
        for data in encoded:
            try:
                revocations = RevocationList.from_bytes(data)
                if self.book.accept(revocations, over_cap=own):
                    accepted.append(revocations)
            except IdentityError as error:
                logger.warning(
                    "refused a revocation list from %s: %s", (source or "disk")[:12], error.message
                )
        if accepted:
            try:
                self._path.write_bytes(self.book.to_bytes())
            except OSError as error:
                logger.warning("cannot save revocations: %s", error)
        return accepted
