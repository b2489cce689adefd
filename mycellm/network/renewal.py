"""Renewing the memberships of joined networks before they lapse: when to ask, whom, and what then.

A member's certificate of a network it joined is signed by the network's authority for a span (30
days by default). Once less than a third of that span, or less than a day, is left
(``held.renewal_due``), the node's heartbeat starts a round in the background that asks the
authority for a fresh one, presenting the certificate held (``joining.request_renewal``): on a new
link to the authority's devices this node is linked to, else to the description's bootstrap
addresses. The renewed certificate replaces the old one on disk in one step, goes in every later
hello, and is sent to the peers of that network, whose links then go on serving it past the old
expiry. Each network is asked at most once per ``retry_s``; after failures the wait doubles, up to
``max_backoff_s``. A lapsed membership is not renewed: its node joins the network again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from mycellm.errors import FederationError, MembershipError, MycellmError, PeerError
from mycellm.federation.descriptions import NetworkDescription
from mycellm.federation.held import HeldNetwork, renewal_due
from mycellm.federation.member_revocations import MemberRevocationList
from mycellm.federation.memberships import MembershipCertificate
from mycellm.network.network_links import NetworkLinks
from mycellm.types import NetworkId

logger = logging.getLogger(__name__)

# The least time between two renewal requests for one network, and the longest wait after failures.
RENEW_RETRY_S = 60.0
RENEW_MAX_BACKOFF_S = 3600.0

# What an authority answers a join or a renewal with, verified: description, membership, revocations.
Admission = tuple[NetworkDescription, MembershipCertificate, MemberRevocationList | None]

# Asks the authority at an address to renew this node's membership of a network.
Ask = Callable[[str, HeldNetwork], Awaitable[Admission]]


class Renewals:
    """The renewals of one node's joined memberships: due ones asked for from the heartbeat, with back-off."""

    def __init__(
        self,
        networks: NetworkLinks,
        ask: Ask,
        *,
        retry_s: float = RENEW_RETRY_S,
        max_backoff_s: float = RENEW_MAX_BACKOFF_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._networks = networks
        self._ask = ask
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._next: dict[NetworkId, float] = {}  # no request for the network before this time
        self._failures: dict[NetworkId, int] = {}
        self._lapsed: set[tuple[NetworkId, int]] = set()  # (network, serial) already reported lapsed
        self.attempts: Counter[NetworkId] = Counter()
        self._task: asyncio.Task[None] | None = None

    def due(self, now: float | None = None) -> list[HeldNetwork]:
        """The joined networks whose membership is due for renewal and may be asked for now."""
        now = self._clock() if now is None else now
        due = []
        for network in self._networks.held.networks():
            if network.hosted:
                continue  # signed here, in memory (see ``held``)
            membership = network.membership
            if membership.expires_at <= now and (network.network_id, membership.serial) not in self._lapsed:
                self._lapsed.add((network.network_id, membership.serial))
                logger.warning("the membership of network %s lapsed: join it again", network.name)
            if renewal_due(membership, now) and self._next.get(network.network_id, 0.0) <= now:
                due.append(network)
        return due

    def start_due(self) -> None:
        """From the heartbeat: start a round for the memberships due, unless one is still running."""
        if self._task is not None and not self._task.done():
            return
        due = self.due()
        if due:
            self._task = asyncio.create_task(self._round(due))

    async def _round(self, due: list[HeldNetwork]) -> None:
        for network in due:
            with contextlib.suppress(MycellmError, OSError):  # logged, and backed off, by ``renew``
                await self.renew(network)

    async def renew(self, network: HeldNetwork) -> HeldNetwork:
        """Ask for ``network``'s renewal now (counted for its back-off); the network as renewed.

        Raises the authority's refusal (MembershipError or FederationError; nothing is kept), or
        PeerError if no address of the authority answered.
        """
        network_id = network.network_id
        now = self._clock()
        self.attempts[network_id] += 1
        try:
            renewed = await self._attempt(network)
        except (MycellmError, OSError) as error:
            failures = min(self._failures.get(network_id, 0) + 1, 32)
            self._failures[network_id] = failures
            wait_s = max(self.retry_s, min(self.retry_s * 2 ** (failures - 1), self.max_backoff_s))
            self._next[network_id] = now + wait_s
            logger.warning(
                "renewal of the membership of %s failed (again in %.0f s): %s", network.name, wait_s, error
            )
            raise
        self._failures.pop(network_id, None)
        self._next[network_id] = now + self.retry_s
        logger.info(
            "membership of %s renewed: serial %d, until %d",
            network.name,
            renewed.membership.serial,
            renewed.membership.expires_at,
        )
        return renewed

    async def _attempt(self, network: HeldNetwork) -> HeldNetwork:
        addresses = self._networks.authority_addresses(network)
        refusal: MycellmError | None = None
        unreachable: list[str] = []
        for address in addresses:
            try:
                description, membership, revocations = await self._ask(address, network)
            except (FederationError, MembershipError) as error:
                refusal = refusal or error  # a bootstrap that is no authority refuses too: try the next
                continue
            except (MycellmError, OSError) as error:
                unreachable.append(f"{address}: {error}")
                continue
            return await self._networks.renewed(description, membership, revocations)
        if refusal is not None:
            raise refusal
        if not addresses:
            raise PeerError(
                f"no address of the authority of {network.name}: no link to it, no bootstrap in its description"
            )
        raise PeerError(f"the authority of {network.name} could not be reached: {'; '.join(unreachable)}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
