"""PeerManager: the node's QUIC endpoint and peer registry; forwards requests to peers and serves theirs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import ray

from actors.errors import unwrap_ray_error
from mycellm.config import NodeSettings
from mycellm.engines.base import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
)
from mycellm.errors import EngineError, ReceiptError
from mycellm.identity import load_or_create_identity
from mycellm.ledger.receipts import Receipt
from mycellm.ledger.tally import RequestTally
from mycellm.peers import PeerService
from mycellm.routing import Route, rank_routes

logger = logging.getLogger(__name__)

ROUTE_PUSH_DELAY_S = 0.1
# A peer's stream crosses four processes per chunk (worker, both PeerManagers, the ingress) on
# cores the engine also decodes on: gathering 50 ms of tokens per frame keeps that cost small.
PEER_CHUNK_INTERVAL_S = 0.05


class _Workers:
    """The LocalServer peers see: this node's InferenceWorkers, reached over Ray."""

    def __init__(self, workers: dict[str, Any], routes: list[Route], ledger: Any, timeout_s: float) -> None:
        self._workers = workers
        self._routes = routes
        self._ledger = ledger
        self._timeout_s = timeout_s
        self.active = 0

    def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for route in self._routes:
            seen.setdefault(route.model.name, route.model)
        return list(seen.values())

    def load(self) -> int:
        return self.active

    async def _call(self, reference: Any, timeout_s: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(reference, timeout=timeout_s or self._timeout_s)
        except TimeoutError as error:
            raise EngineError(f"no answer within {timeout_s or self._timeout_s:.0f} s") from error
        except ray.exceptions.RayError as error:
            raise unwrap_ray_error(error) from error

    async def generate(
        self, request: GenerationRequest, peer_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        served = RequestTally(request.request_id, request.kind, request.model)
        route = rank_routes(self._routes, request.model)[0]
        served.route = route
        worker = self._workers[route.target]
        finished = False
        self.active += 1
        try:
            chunk = await self._call(worker.open.remote(request, self._timeout_s))
            sent_at = time.monotonic()
            served.mark_first_token()
            while True:
                if chunk is not None:
                    if chunk.usage is not None:
                        served.prompt_tokens = chunk.usage.prompt_tokens
                        served.completion_tokens = chunk.usage.completion_tokens
                    finished = chunk.is_final
                    yield chunk
                    sent_at = time.monotonic()
                    if finished:
                        return
                pause = PEER_CHUNK_INTERVAL_S - (time.monotonic() - sent_at)
                if pause > 0:
                    await asyncio.sleep(pause)
                chunk = await self._call(worker.pull.remote(request.request_id, 30.0), 60.0)
        except BaseException as error:
            if not finished:  # closing the generator after its final chunk is no failure
                served.fail(error)
            raise
        finally:
            self.active -= 1
            if not finished:
                worker.cancel.remote(request.request_id)
            record = served.to_record()
            if record is not None:
                self._ledger.record_request.remote(record)

    async def embed(self, request: EmbeddingRequest, peer_id: str) -> EmbeddingResult:
        route = rank_routes(self._routes, request.model, capability="embeddings")[0]
        return await self._call(self._workers[route.target].embed.remote(request))


class _LedgerKeeper:
    """The CreditKeeper peers' payments use: this node's Ledger actor."""

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger

    async def _call(self, reference: Any) -> Any:
        try:
            return await asyncio.wait_for(reference, timeout=30.0)
        except TimeoutError as error:
            raise EngineError("the ledger did not answer within 30 s") from error
        except ray.exceptions.RayError as error:
            raise unwrap_ray_error(error) from error

    async def balance(self, account_id: str) -> int:
        return int(await self._call(self._ledger.balance.remote(account_id)))

    async def join(self, account_id: str) -> int:
        return int(await self._call(self._ledger.join.remote(account_id)))

    async def remember_offer(self, request_id: str, peer_id: str, terms: bytes, signature: bytes) -> None:
        await self._call(self._ledger.remember_offer.remote(request_id, peer_id, terms, signature))

    async def pending_offers(self, peer_id: str) -> list[tuple[str, bytes, bytes]]:
        return list(await self._call(self._ledger.pending_offers.remote(peer_id)))

    async def forget_offer(self, request_id: str) -> None:
        await self._call(self._ledger.forget_offer.remote(request_id))

    async def receipt(self, request_id: str) -> bytes | None:
        found: bytes | None = await self._call(self._ledger.receipt.remote(request_id))
        return found

    async def settle(self, receipt: Receipt, observed: bool = False) -> bool:
        try:
            await self._call(self._ledger.settle.remote(receipt.to_bytes(), False, observed))
        except ReceiptError as error:
            if error.code == "receipt_replayed":
                return False
            raise
        return True


class PeerManager:
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
        self._local = _Workers(workers, local_routes, ledger, settings.request_timeout_s)
        self._service = PeerService(
            settings, identity, self._local, on_change=self._routes_changed, keeper=_LedgerKeeper(ledger)
        )
        self._push: asyncio.Task[None] | None = None

    async def start(self) -> int:
        return await self._service.start()

    async def stop(self) -> None:
        await self._service.stop()

    def _routes_changed(self) -> None:
        # Many changes arrive together (a hello, a round of pongs): push one table after them.
        if self._push is None or self._push.done():
            self._push = asyncio.get_running_loop().create_task(self._push_routes())

    async def _push_routes(self) -> None:
        await asyncio.sleep(ROUTE_PUSH_DELAY_S)
        routes: list[Route] = []
        for peer_id, session in self._service.sessions.items():
            record = self._service.registry.reputation_of(peer_id)
            for model in session.hello.models:
                routes.append(
                    Route(
                        kind="peer",
                        target=peer_id,
                        model=model,
                        latency_ms=(record.rtt_ms or 0.0) if record else 0.0,
                        load=record.load if record else 0,
                        success_rate=record.reputation if record else 1.0,  # decayed; receipts count
                        hops=1,
                    )
                )
        try:
            await self._resolver.set_peer_routes.remote(routes)
        except ray.exceptions.RayError as error:
            logger.warning("could not update the resolver: %s", error)

    # -- forwarding (called by the ingress) ---------------------------------------------------

    async def open(self, peer_id: str, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        return await self._service.forwarder.open(peer_id, request, wait_s)

    async def pull(self, request_id: str, wait_s: float = 30.0) -> GenerationChunk | None:
        return await self._service.forwarder.pull(request_id, wait_s)

    async def cancel(self, request_id: str) -> bool:
        return await self._service.forwarder.cancel(request_id)

    async def complete(self, peer_id: str, request: GenerationRequest) -> CompletionResult:
        return await self._service.forwarder.complete(peer_id, request)

    async def embed(
        self, peer_id: str, request: EmbeddingRequest, timeout_s: float = 600.0
    ) -> EmbeddingResult:
        return await self._service.forwarder.embed(peer_id, request, timeout_s)

    # -- views --------------------------------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        service = self._service
        return {
            "peer_id": service.peer_id,
            "quic_port": service.port,
            "address": service.address,
            "connected": sorted(service.sessions),
            "peers": [
                record.model_dump(mode="json")
                | {"success_rate": record.success_rate, "reputation": record.reputation}
                for record in (
                    service.registry.reputation_of(peer.peer_id) or peer for peer in service.peers()
                )
            ],
            "revocations": [
                {"account_id": item.account_id, "serial": item.serial, "revoked": len(item.revoked)}
                for item in service.revocations.lists()
            ],
        }
