"""Serving one OpenAI request, Ray-free: validated body in, routed answer (JSON or SSE events) out.

The HTTP layer (``serve_app``) reads the body, calls ``NodeServing`` and picks the status; the
route table, the targets and the recorder of finished requests are passed in, so tests drive
this with engines in the process and the ingress drives it with actors.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mycellm.api.auth import Caller
from mycellm.api.budgets import BudgetKeeper
from mycellm.api.networks import choose_network
from mycellm.api.openai import ChatCompletionBody, CompletionBody, EmbeddingBody
from mycellm.api.responses import (
    chat_chunk_json,
    chat_completion_json,
    completion_chunk_json,
    completion_json,
    embeddings_json,
    usage_chunk_json,
)
from mycellm.api.tally import RequestTally
from mycellm.errors import EngineError, ModelNotFoundError, MycellmError, RequestCancelledError
from mycellm.ledger.pricing import PriceTable
from mycellm.routing.directory import NetworkEntry, RouteSnapshot
from mycellm.routing.failover import RoutedStream, TargetFor, complete_on, embed_on
from mycellm.routing.in_flight import InFlight
from mycellm.routing.ranking import Capability, Route, RoutingOptions, rank_routes
from mycellm.types import EmbeddingRequest, RequestId

logger = logging.getLogger(__name__)

ROUTE_CACHE_S = 1.0
MISS_REFRESH_S = 0.1  # a request for a model the table lacks refreshes it, at most this often
DONE = b"data: [DONE]\n\n"

RouteTable = Callable[[], Awaitable[RouteSnapshot]]
ReaderLeft = Callable[[], Awaitable[bool]]


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True)
class Answer:
    """A routed answer: ``payload`` (JSON) or ``events`` (SSE bytes), and the route that gave it."""

    route: Route
    served_by: str
    payload: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None


class NodeServing:
    """Failover, resume, usage and the record of every request, for the ingress of one node."""

    def __init__(
        self,
        *,
        node_peer_id: str,
        route_table: RouteTable,
        target_for: TargetFor,
        on_finished: Callable[[RequestTally], None],
        open_wait_s: float,
        on_started: Callable[[RequestTally], None] = lambda served: None,
        budgets: BudgetKeeper | None = None,
    ) -> None:
        self._on_started = on_started
        self._budgets = budgets
        self._node_peer_id = node_peer_id
        self._route_table = route_table
        self._target_for = target_for
        self._on_finished = on_finished
        self._open_wait_s = open_wait_s
        self._table: RouteSnapshot | None = None
        self._table_at = 0.0
        self._in_flight = InFlight()  # spreads requests over the workers of a model

    # -- routes ---------------------------------------------------------------------------------

    async def snapshot(self, max_age_s: float = ROUTE_CACHE_S) -> RouteSnapshot:
        # The Resolver owns the table; ranking runs on a copy refreshed at most every
        # ROUTE_CACHE_S (and at once after a route fails), keeping an RPC off every request.
        now = time.monotonic()
        if self._table is None or now - self._table_at > max_age_s:
            self._table, self._table_at = await self._route_table(), now
        return self._table

    async def network(
        self, caller: Caller | None, options: RoutingOptions | None = None, header: str | None = None
    ) -> NetworkEntry | None:
        """The network a request runs in (see ``mycellm.api.networks``)."""
        body_network = options.network if options is not None else None
        return choose_network(await self.snapshot(), caller, body_network, header)

    async def routes(
        self,
        model: str,
        options: RoutingOptions | None,
        capability: Capability,
        network: NetworkEntry | None = None,
    ) -> list[Route]:
        """The routes for ``model`` in ``network`` (local ones and its peers'), best first. A model
        the cached table lacks is looked for once more in a fresh one (a peer that just linked)."""
        network_id = network.network_id if network is not None else None
        try:
            table = self._in_flight.weigh((await self.snapshot()).routes_of(network))
            ranked = rank_routes(table, model, options, capability=capability, network_id=network_id)
        except ModelNotFoundError:
            table = self._in_flight.weigh((await self.snapshot(MISS_REFRESH_S)).routes_of(network))
            ranked = rank_routes(table, model, options, capability=capability, network_id=network_id)
        return ranked[:1] if options is not None and options.fallback == "fail" else ranked

    def _route_failed(self, route: Route, error: EngineError) -> None:
        self._table = None  # the table may be stale: refresh it on the next request

    def _finish(self, served: RequestTally) -> None:
        self._in_flight.ended(served.request_id)
        if self._budgets is not None:
            self._budgets.settle(served)
        self._on_finished(served)

    def served_by(self, route: Route) -> str:
        return route.target if route.kind == "peer" else self._node_peer_id

    def route_info(self, route: Route) -> dict[str, Any]:
        return {"route": route.kind, "target": route.target, "served_by": self.served_by(route)}

    # -- requests -------------------------------------------------------------------------------

    async def generate(
        self,
        body: ChatCompletionBody | CompletionBody,
        reader_left: ReaderLeft | None = None,
        caller: Caller | None = None,
        network_header: str | None = None,
    ) -> Answer:
        """A chat or legacy completion; a stream is open (first chunk in hand) when this returns.

        It runs in one network (the caller's key's, the body's, the header's or the node's default)
        and is routed to this node's workers or that network's peers only. A ``caller`` with an API
        key has the request's worst-case price in that network reserved before any work (402 over
        its budget) and settled when the answer ends."""
        chat = isinstance(body, ChatCompletionBody)
        served = RequestTally(
            RequestId(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"),
            "chat" if chat else "completion",
            body.model,
        )
        self._on_started(served)
        try:
            body.check_supported()
            network = await self.network(caller, body.mycellm, network_header)
            routes = await self.routes(body.model, body.mycellm, "chat", network)
            self._in_flight.placed(served.request_id, routes[0])
            generation = body.to_request(served.request_id, routes[0].model.name)
            if network is not None:
                generation = generation.model_copy(update={"network_id": network.network_id})
            if self._budgets is not None:
                await self._budgets.hold(served, caller, routes, generation, _prices(network))
            if body.stream:
                stream = RoutedStream(
                    generation,
                    routes,
                    self._target_for,
                    served,
                    open_wait_s=self._open_wait_s,
                    on_failure=self._route_failed,
                )
                route = await stream.open()
                events = self._events(body, stream, served, reader_left)
                return Answer(route=route, served_by=self.served_by(route), events=events)
            result, route = await complete_on(
                generation, routes, self._target_for, served, self._route_failed
            )
        except BaseException as error:
            served.fail(error)
            self._finish(served)
            raise
        self._finish(served)
        build = chat_completion_json if chat else completion_json
        payload = build(served.request_id, route.model.name, result, {"mycellm": self.route_info(route)})
        return Answer(route=route, served_by=self.served_by(route), payload=payload)

    async def embed(
        self, body: EmbeddingBody, caller: Caller | None = None, network_header: str | None = None
    ) -> Answer:
        inputs = body.inputs()
        served = RequestTally(RequestId(f"embd-{uuid.uuid4().hex}"), "embedding", body.model)
        self._on_started(served)
        try:
            network = await self.network(caller, body.mycellm, network_header)
            routes = await self.routes(body.model, body.mycellm, "embeddings", network)
            self._in_flight.placed(served.request_id, routes[0])
            request = EmbeddingRequest(
                request_id=served.request_id,
                model=routes[0].model.name,
                inputs=inputs,
                network_id=network.network_id if network is not None else None,
            )
            if self._budgets is not None:
                await self._budgets.hold(served, caller, routes, request, _prices(network))
            result, route = await embed_on(request, routes, self._target_for, served, self._route_failed)
            payload = embeddings_json(route.model.name, result, body.encoding_format)
            return Answer(route=route, served_by=self.served_by(route), payload=payload)
        except BaseException as error:
            served.fail(error)
            raise
        finally:
            self._finish(served)

    async def _events(
        self,
        body: ChatCompletionBody | CompletionBody,
        stream: RoutedStream,
        served: RequestTally,
        reader_left: ReaderLeft | None,
    ) -> AsyncIterator[bytes]:
        """The SSE events of a stream: role, chunks, usage if asked, then [DONE]; errors as events."""
        assert stream.route is not None
        chat = isinstance(body, ChatCompletionBody)
        model, request_id, created = stream.route.model.name, served.request_id, int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream.chunks(reader_left)
        try:
            if chat:
                role = chat_chunk_json(request_id, model, created, None, role=True)
                yield sse(role | {"mycellm": self.route_info(stream.route)})
            async for chunk in chunks:
                served.delivered_bytes += len(chunk.text.encode())
                if chat:
                    yield sse(chat_chunk_json(request_id, model, created, chunk))
                else:
                    yield sse(completion_chunk_json(request_id, model, created, chunk))
                if chunk.is_final and chunk.usage is not None and include_usage:
                    name = "chat.completion.chunk" if chat else "text_completion"
                    yield sse(usage_chunk_json(request_id, model, created, chunk.usage, name))
            yield DONE
        except RequestCancelledError as error:
            # The reader is gone: nobody reads what we would send, and a yield here could wait
            # for a reader that never comes, so the record would be lost.
            served.fail(error)
        except MycellmError as error:
            served.fail(error)
            yield sse(error.to_openai())
            yield DONE
        except BaseException as error:  # the reader went away (cancellation) or the stream broke
            served.fail(error)
            raise
        finally:
            # Record first: the rest of this block may run while the task is being torn down.
            self._finish(served)
            stream.cancel()
            await chunks.aclose()


def _prices(network: NetworkEntry | None) -> PriceTable | None:
    return PriceTable(network.prices) if network is not None else None
