"""Who is calling the HTTP API: the key a request presents, checked against a cache of the key table, its scope and limits.

The rule for callers without a key (``auth.allow_anonymous``, see the README): ``true`` accepts
them and ``false`` refuses them everywhere; unset, a node bound to loopback accepts them while its
key table is empty (no key was ever created) and refuses them from the first key on, and a node
bound to any other address refuses them (and does not start without an active key). A credential
that is not a mycellm key (the openai client needs *some* ``api_key``: ``Bearer unused``) counts
as no key where anonymous callers are accepted; a mycellm key is always checked, and a wrong,
revoked or expired one is a 401 even where anonymous callers are accepted.

The gate keeps every key record (digests only) in memory and reloads them from the Ledger at most
every ``refresh_s`` while requests come, so a key revoked by the CLI (offline, in the database)
stops working within about that time, and a request costs no database round trip. The reload also
writes when keys were last used. A key id the cache does not know, checked against a table read
before the request came, waits for a newer read (a key created a moment ago is found); such reads
stay ``MIN_RELOAD_S`` apart.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mycellm.api.keys import ROUTE_SCOPES, Scope, check_key, key_id_of, looks_like_key
from mycellm.api.limits import FailureLockout, RateWindow, retry_after
from mycellm.config import AuthSettings
from mycellm.errors import AuthenticationError, MycellmError, PermissionDeniedError, RateLimitedError
from mycellm.ledger.api_keys import ApiKeyRecord

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
MIN_RELOAD_S = 0.25

# Touches (key id -> last use) go in, every key record comes out: one Ledger call.
KeyLoader = Callable[[dict[str, float]], Awaitable[list[ApiKeyRecord]]]


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request: a key, or anonymous (``key_id`` None).

    ``network`` is the key's network as it was given (an id or a name; None: the node's default
    network). Which network a request runs in is decided from it elsewhere.
    """

    key_id: str | None
    scopes: frozenset[str]
    name: str = ""
    network: str | None = None
    budget_micro: int | None = None

    @classmethod
    def of(cls, record: ApiKeyRecord) -> Caller:
        return cls(record.key_id, frozenset(record.scopes), record.name, record.network, record.budget_micro)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the node reachable from this machine only (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(auth: AuthSettings, host: str, active_keys: int) -> str | None:
    """Why a node must not start bound to ``host`` (the message names the fix), or None."""
    if is_loopback(host) or auth.allow_anonymous is True or active_keys > 0:
        return None
    return (
        f"host {host} is reachable from other machines and this node has no active API key: "
        "create one first (mycellm keys create --scope inference, on this data directory), "
        "or set auth.allow_anonymous: true to serve anyone who can reach it"
    )


def error_headers(error: MycellmError) -> dict[str, str] | None:
    """The headers an error answer needs: the challenge of a 401 (RFC 9110), Retry-After of a 429."""
    if isinstance(error, AuthenticationError):
        return {"WWW-Authenticate": 'Bearer realm="mycellm"'}
    if isinstance(error, RateLimitedError):
        return {"Retry-After": str(retry_after(error.retry_after_s))}
    return None


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The credential of ``Authorization: Bearer`` or ``X-API-Key``; two different mycellm keys are a 401."""
    candidates = []
    if api_key := headers.get("x-api-key", "").strip():
        candidates.append(api_key)
    if authorization := headers.get("authorization", "").strip():
        scheme, _, value = authorization.partition(" ")
        candidates.append(value.strip() if scheme.lower() == "bearer" else authorization)
    keys = {candidate for candidate in candidates if looks_like_key(candidate)}
    if len(keys) > 1:
        raise AuthenticationError(
            "the Authorization and X-API-Key headers carry different API keys", code="conflicting_api_keys"
        )
    return keys.pop() if keys else (candidates[0] if candidates else None)


class KeyGate:
    """Admits each request by its key (or anonymously), for the ingress of one node."""

    def __init__(
        self,
        settings: AuthSettings,
        host: str,
        load: KeyLoader,
        *,
        clock: Callable[[], float] = time.time,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self._settings = settings
        self._loopback = is_loopback(host)
        self._load = load
        self._clock = clock
        self._refresh_s = refresh_s
        self._lockout = FailureLockout(
            settings.lockout_failures,
            settings.lockout_window_s,
            settings.lockout_s,
            settings.lockout_max_sources,
        )
        self._rates = RateWindow()
        self._anonymous = Caller(None, frozenset(settings.anonymous_scopes))
        self._keys: dict[str, ApiKeyRecord] = {}
        self._loaded_at = -float("inf")  # when the cached table was read (monotonic)
        self._stale_before = -float("inf")  # a table read before this is stale (a change made here)
        self._loading: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._used: dict[str, float] = {}

    async def admit(self, headers: Mapping[str, str], source: str, route: str) -> Caller:
        """The caller of a request to ``route``; 401, 403 or 429 (see the module text) if refused."""
        scope = ROUTE_SCOPES[route]
        if scope is None:
            return self._anonymous
        now = self._clock()
        self._lockout.check(source, now)
        try:
            credential = presented_key(headers)
        except AuthenticationError as error:
            raise self._failed(source, now, error) from None
        if credential is None or not looks_like_key(credential):
            return await self._without_key(credential, source, now, scope)
        record = await self._verified(credential, source, now)
        if scope not in record.scopes:
            raise PermissionDeniedError(
                f"API key {record.key_id} has the scopes {', '.join(record.scopes)}; this endpoint needs {scope}"
            )
        if record.rpm is not None:
            self._rates.admit(record.key_id, record.rpm, now)
        self._touch(record.key_id, now)
        return Caller.of(record)

    async def anonymous_allowed(self) -> bool:
        if self._settings.allow_anonymous is not None:
            return self._settings.allow_anonymous
        if not self._loopback:
            return False
        await self._fresh()
        return not self._keys

    def forget(self) -> None:
        """Reload the keys before the next check (a key was created or revoked here)."""
        self._stale_before = time.monotonic()

    async def _without_key(self, credential: str | None, source: str, now: float, scope: Scope) -> Caller:
        if not await self.anonymous_allowed():
            if credential is not None:  # a credential, but no mycellm key: a failure
                raise self._failed(source, now, AuthenticationError("Incorrect API key provided"))
            raise AuthenticationError(
                "You didn't provide an API key: send Authorization: Bearer <key> or X-API-Key: <key>",
                code="missing_api_key",
            )
        if scope not in self._anonymous.scopes:
            raise AuthenticationError(
                f"this endpoint needs an API key with scope {scope}", code="missing_api_key"
            )
        return self._anonymous

    async def _verified(self, credential: str, source: str, now: float) -> ApiKeyRecord:
        arrived = time.monotonic()
        await self._fresh()
        for attempt in range(3):
            try:
                return check_key(credential, self._keys, now)
            except AuthenticationError as error:
                refused = error
            key_id = key_id_of(credential)
            if attempt == 2 or key_id is None or key_id in self._keys or self._loaded_at >= arrived:
                break
            # A key id the cache does not know, and a cache older than this request: perhaps a key
            # created a moment ago. Reloads stay MIN_RELOAD_S apart, however many such requests come.
            await asyncio.sleep(max(0.0, self._loaded_at + MIN_RELOAD_S - time.monotonic()))
            if self._loaded_at < arrived:
                await self._reload()
        raise self._failed(source, now, refused)

    def _failed(self, source: str, now: float, error: MycellmError) -> MycellmError:
        locked = self._lockout.fail(source, now)
        return locked if locked is not None else error

    # -- the cache ------------------------------------------------------------------------------

    async def _fresh(self) -> None:
        for _ in range(2):  # a reload under way may have read the table before it went stale
            if time.monotonic() - self._loaded_at <= self._refresh_s and self._loaded_at > self._stale_before:
                return
            await self._reload()

    async def _reload(self) -> None:
        """One reload at a time; a request that leaves does not cancel the reload others wait for."""
        if self._loading is None or self._loading.done():
            # A task in a context of its own: Serve cancels a request's calls when its client leaves.
            loop = asyncio.get_running_loop()
            self._loading = loop.create_task(self._load_keys(), context=contextvars.Context())
        await asyncio.shield(self._loading)

    async def _load_keys(self) -> None:
        started = time.monotonic()  # the table read is at least this new
        used, self._used = self._used, {}
        try:
            records = await self._load(used)
        except BaseException:
            self._used = used | self._used  # written with the next reload
            raise
        self._keys = {record.key_id: record for record in records}
        self._loaded_at = started
        self._rates.forget({key_id for key_id, record in self._keys.items() if record.rpm is not None})

    def _touch(self, key_id: str, now: float) -> None:
        self._used[key_id] = now
        if self._flushing is None or self._flushing.done():
            loop = asyncio.get_running_loop()
            self._flushing = loop.create_task(self._flush_later(), context=contextvars.Context())

    async def _flush_later(self) -> None:
        """Write the last uses even when no request comes to trigger a reload."""
        await asyncio.sleep(self._refresh_s)
        if self._used:
            try:
                await self._reload()
            except MycellmError as error:
                logger.warning("could not note API key use: %s", error.message)
