"""PeerManager: the node's QUIC endpoint and peer registry; forwards requests to peers and serves theirs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import ray

from actors.actor_metrics import LinkMetrics
from actors.calls import ActorMethods, call_actor
from actors.local_workers import LocalWorkers
from actors.recorder import Recorder
from mycellm.config import NodeSettings, PriceSettings
from mycellm.identity.keys import load_or_create_identity
from mycellm.network.service import PeerService
from mycellm.network.settlement import CreditKeeper
from mycellm.routing.directory import NetworkEntry
from mycellm.routing.peer_routes import peer_routes
from mycellm.routing.ranking import Route
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    NetworkId,
    PeerId,
    RequestId,
    Usage,
)

logger = logging.getLogger(__name__)

ROUTE_PUSH_DELAY_S = 0.1
LEDGER_TIMEOUT_S = 30.0


class PeerManager:
    """The Ray actor over one PeerService: this node's links to its peers and the requests over them.

    State: the PeerService (QUIC endpoint, sessions, peer registry, revocations, streams of
    requests in both directions, pending payments) and the task that pushes peer routes to the
    Resolver. The registry is saved to the data directory; everything else is rebuilt on restart.
    Callers: ``actors.builders`` (start, stop; set_local_workers as machines join and leave, last
    write wins), the ingress through its peer RouteTargets (open,
    pull, cancel, complete, embed) and its /v1/node/peers view (describe). Idempotent: ``cancel``
    (a stream already gone answers False) and ``describe``. Not idempotent: ``pull`` takes what
    arrived since the last pull; ``open``, ``complete`` and ``embed`` send a new request each call
    (a request id already streaming is refused).
    """

    def __init__(
        self,
        settings: NodeSettings,
        resolver: Any,
        ledger: Any,
        workers: dict[str, Any],
        local_routes: list[Route],
    ) -> None:
        identity = load_or_create_identity(settings.resolved_data_dir, node_name=settings.node_name)
        self._resolver = resolver
        self._settings = settings
        self._local = LocalWorkers(workers, local_routes, Recorder(ledger), settings.request_timeout_s)
        self._ledger = ledger

        async def keepers(network_id: NetworkId, prices: PriceSettings) -> CreditKeeper:
            await call_actor(ledger.open_book.remote(network_id, prices), LEDGER_TIMEOUT_S)
            return cast(
                CreditKeeper, ActorMethods(ledger, CreditKeeper, LEDGER_TIMEOUT_S, network_id=network_id)
            )

        self._service = PeerService(
            settings, identity, self._local, on_change=self._routes_changed, keepers=keepers
        )
        self._push: asyncio.Task[None] | None = None
        self._metrics = LinkMetrics()

    async def start(self) -> int:
        port = await self._service.start()
        with contextlib.suppress(Exception):  # a node in no network yet keeps no books
            default = self._service.networks.default_id()
            prices = self._service.networks.terms(default).settler
            if prices is not None:
                await call_actor(
                    self._ledger.open_book.remote(default, prices.prices.settings, True), LEDGER_TIMEOUT_S
                )
        self._routes_changed()  # the ingress learns the node's networks before any peer links
        return port

    async def stop(self) -> None:
        await self._service.stop()

    def _routes_changed(self) -> None:
        # Many changes arrive together (a hello, a round of pongs): push one table after them.
        if self._push is None or self._push.done():
            self._push = asyncio.get_running_loop().create_task(self._push_routes())

    async def _push_routes(self) -> None:
        await asyncio.sleep(ROUTE_PUSH_DELAY_S)
        links = self._service.describe()["links"]
        self._metrics.set(links["inbound"], links["outbound"])
        routes = [
            route
            for peer in self._service.linked_peers()
            for network_id in peer.networks
            for route in peer_routes(
                peer.peer_id,
                map(self._service.networks.terms(network_id).priced, peer.models),
                rtt_ms=peer.rtt_ms,
                load=peer.load,
                reputation=peer.reputation,
                network_id=network_id,
            )
        ]
        networks = self._service.networks
        entries = [
            NetworkEntry(
                network.network_id,
                network.name,
                network.description.prices.to_settings(self._settings.credits),
            )
            for network in networks.held.networks()
        ]
        try:
            default = networks.default_id() if entries else None
            await self._resolver.set_peer_routes.remote(routes, default, entries)
        except ray.exceptions.RayError as error:
            logger.warning("could not update the resolver: %s", error)

    async def set_local_workers(self, workers: dict[str, Any], routes: list[Route]) -> None:
        """Serve peers from the workers now running (a machine joined or left the cluster)."""
        self._local.replace(workers, routes)

    # -- forwarding (called by the ingress) ---------------------------------------------------

    async def open(self, peer_id: PeerId, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        return await self._service.open(peer_id, request, wait_s)

    async def pull(self, request_id: RequestId, wait_s: float = 30.0) -> GenerationChunk | None:
        return await self._service.pull(request_id, wait_s)

    async def follow(self, request_id: RequestId) -> AsyncIterator[GenerationChunk]:
        """The rest of an opened stream, one Ray streaming-generator item per delivery."""
        async for chunk in self._service.follow(request_id):
            yield chunk

    async def cancel(self, request_id: RequestId) -> bool:
        return await self._service.cancel(request_id)

    async def settle_broken(self, request_id: RequestId, usage: Usage) -> None:
        self._service.settle_broken(request_id, usage)

    async def complete(self, peer_id: PeerId, request: GenerationRequest) -> CompletionResult:
        return await self._service.complete(peer_id, request)

    async def embed(
        self, peer_id: PeerId, request: EmbeddingRequest, timeout_s: float = 600.0
    ) -> EmbeddingResult:
        return await self._service.embed(peer_id, request, timeout_s)

    # -- views --------------------------------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        return self._service.describe()
