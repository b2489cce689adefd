"""The Ledger's calls on API keys: the key table the ingress caches, key management, budget reservations."""

from __future__ import annotations

import time

from mycellm.ledger.api_keys import ApiKeyBook, ApiKeyRecord


class ApiKeyCalls:
    """Mixed into the Ledger actor, over the same store; ``_api_keys`` is set by ``Ledger.start``.

    Callers: the ingress (its KeyGate reloads the table and notes last uses; its BudgetKeeper
    reserves and settles; the admin endpoints create and revoke). Idempotent: ``reserve_budget``
    and ``settle_budget`` by request id, ``revoke_api_key`` (the first revocation's time stays).
    The offline CLI writes the same table directly; the ingress sees it at its next reload.
    """

    _api_keys: ApiKeyBook | None = None

    def _key_book(self) -> ApiKeyBook:
        assert self._api_keys is not None, "Ledger.start was not awaited"
        return self._api_keys

    async def api_keys(self, used: dict[str, float] | None = None) -> list[ApiKeyRecord]:
        """Every key (after noting ``used``: key id -> when it was last used)."""
        await self._key_book().touch(used or {})
        return await self._key_book().keys()

    async def create_api_key(self, record: ApiKeyRecord) -> None:
        await self._key_book().create(record)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        return await self._key_book().revoke(key_id, time.time())

    async def reserve_budget(self, key_id: str, request_id: str, amount: int, now: float) -> bool:
        return await self._key_book().reserve(key_id, request_id, amount, now)

    async def settle_budget(
        self, key_id: str, request_id: str, actual: int, now: float, reserved: bool
    ) -> bool:
        return await self._key_book().settle(key_id, request_id, actual, now, reserved=reserved)
