"""Ray Serve ingress of a node: the OpenAI API, the node API, /health and /metrics on :8420."""

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.errors import unwrap_ray_error
from actors.targets import RouteTarget, route_target
from mycellm import __version__
from mycellm.engines.base import EmbeddingRequest, GenerationChunk, GenerationRequest
from mycellm.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    MycellmError,
    NoRouteError,
    RequestCancelledError,
)
from mycellm.ledger.records import ServedRequestRecord
from mycellm.ledger.tally import RequestTally
from mycellm.metrics import NodeMetrics
from mycellm.model_cards import model_cards
from mycellm.openai_api import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    chat_chunk_json,
    chat_completion_json,
    completion_chunk_json,
    completion_json,
    embeddings_json,
    error_json,
    parse_body,
    usage_chunk_json,
)
from mycellm.routing import Route, rank_routes

logger = logging.getLogger("mycellm.serve")

ROUTE_CACHE_S = 1.0
DISCONNECT_CHECK_S = 0.25

app = FastAPI(title="mycellm", version=__version__, docs_url=None, redoc_url=None)


@app.exception_handler(MycellmError)
async def _mycellm_error(request: Request, error: MycellmError) -> JSONResponse:
    return JSONResponse(error.to_openai(), status_code=error.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return JSONResponse(
        error_json(f"{field}: {first['msg']}", "invalid_request_error", field), status_code=400
    )


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_json(str(error.detail), kind), status_code=error.status_code)


def _account_param(account: str | None) -> str | None:
    if account is not None and not re.fullmatch(r"[0-9a-f]{64}", account):
        raise InvalidRequestError(
            "account must be an account id (64 lowercase hex characters)", param="account"
        )
    return account


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@serve.deployment(name="NodeIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class NodeIngress:
    def __init__(
        self,
        node: dict[str, Any],
        resolver: Any,
        ledger: Any,
        workers: dict[str, Any],
        peer_manager: Any = None,
    ) -> None:
        self._node = node
        self._resolver = resolver
        self._ledger = ledger
        self._workers = workers
        self._peer_manager = peer_manager
        self._timeout_s = float(node.get("request_timeout_s", 600.0))
        self._started = time.time()
        self._metrics = NodeMetrics()
        self._route_table: list[Route] | None = None
        self._records: asyncio.Queue[ServedRequestRecord] = asyncio.Queue()
        self._recorder: asyncio.Task[None] | None = None
        self._route_table_at = 0.0

    # -- OpenAI API ---------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionBody)
        return await self._generate(body, "chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        body = parse_body(await request.body(), CompletionBody)
        return await self._generate(body, "completion", request)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        body = parse_body(await request.body(), EmbeddingBody)
        inputs = body.inputs()
        served = RequestTally(f"embd-{uuid.uuid4().hex}", "embedding", body.model)
        self._metrics.in_flight.inc()
        try:
            routes = await self._routes(body.model, body.mycellm, "embeddings")
            route = routes[0]
            served.route, served.model = route, route.model.name
            embed_request = EmbeddingRequest(
                request_id=served.request_id, model=route.model.name, inputs=inputs
            )
            result = await self._call(self._target(route).embed(embed_request))
            served.prompt_tokens = result.prompt_tokens
            served.mark_first_token()
            return JSONResponse(embeddings_json(route.model.name, result, body.encoding_format))
        except BaseException as error:
            served.fail(error)
            raise
        finally:
            self._finish(served)

    @app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await self._model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> JSONResponse:
        for card in await self._model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")

    # -- node API -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        workers = await self._describe_workers()
        # A relay (no local model) is healthy with no workers; a node with workers needs them ready.
        ready = all(worker.get("ready") for worker in workers)
        return JSONResponse(
            {"status": "ok" if ready else "degraded", "workers": len(workers)},
            status_code=200 if ready else 503,
        )

    @app.get("/v1/node/status")
    async def node_status(self) -> JSONResponse:
        workers = await self._describe_workers()
        totals = await self._call(self._ledger.totals.remote())
        return JSONResponse(
            {
                "peer_id": self._node["peer_id"],
                "account_id": self._node["account_id"],
                "node_name": self._node["node_name"],
                "version": __version__,
                "uptime_s": round(time.time() - self._started, 3),
                "models": await self._model_cards(),
                "workers": workers,
                "requests": totals.model_dump(),
                "ray": {"namespace": self._node.get("namespace"), "resources": ray.cluster_resources()},
            }
        )

    @app.get("/v1/node/requests")
    async def node_requests(self, limit: int = 50) -> JSONResponse:
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000", param="limit")
        records = await self._call(self._ledger.recent_requests.remote(limit))
        return JSONResponse(
            {"object": "list", "data": [record.model_dump(mode="json") for record in records]}
        )

    @app.get("/v1/node/credits")
    async def node_credits(self, account: str | None = None, limit: int = 20) -> JSONResponse:
        account_id = _account_param(account) or self._node["account_id"]
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000", param="limit")
        return JSONResponse(await self._call(self._ledger.credits_view.remote(account_id, limit)))

    @app.get("/v1/node/receipts")
    async def node_receipts(
        self,
        limit: int = 50,
        offset: int = 0,
        account: str | None = None,
        role: str = "any",
        model: str | None = None,
    ) -> JSONResponse:
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000", param="limit")
        if offset < 0:
            raise InvalidRequestError("offset must not be negative", param="offset")
        if role not in ("any", "consumer", "seeder"):
            raise InvalidRequestError("role must be any, consumer or seeder", param="role")
        page = await self._call(
            self._ledger.receipts.remote(limit, offset, _account_param(account), role, model)
        )
        return JSONResponse({"object": "list", "data": page, "limit": limit, "offset": offset})

    @app.get("/v1/node/peers")
    async def node_peers(self) -> JSONResponse:
        if self._peer_manager is None:
            return JSONResponse({"object": "list", "data": [], "connected": []})
        view = await self._call(self._peer_manager.describe.remote())
        return JSONResponse({"object": "list", "data": view.pop("peers"), **view})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self._metrics.render(), media_type=self._metrics.content_type)

    # -- internals ------------------------------------------------------------------------------

    async def _call(self, reference: Any) -> Any:
        """Await a Ray call with the node's timeout, translating Ray's errors into ours."""
        try:
            return await asyncio.wait_for(reference, timeout=self._timeout_s)
        except TimeoutError as error:
            raise EngineError(f"no answer within {self._timeout_s:.0f} s") from error
        except ray.exceptions.RayError as error:
            raise unwrap_ray_error(error) from error

    async def _routes(self, model: str, options: Any, capability: str) -> list[Route]:
        # The Resolver owns the table; the ingress ranks on a copy refreshed at most every
        # ROUTE_CACHE_S (and at once after a route fails), keeping an RPC off every request.
        now = time.monotonic()
        if self._route_table is None or now - self._route_table_at > ROUTE_CACHE_S:
            routes = await self._call(self._resolver.routes.remote())
            self._route_table, self._route_table_at = routes, now
        ranked = rank_routes(self._route_table, model, options, capability=capability)
        return ranked[:1] if options is not None and options.fallback == "fail" else ranked

    def _target(self, route: Route) -> RouteTarget:
        return route_target(route, self._workers, self._peer_manager)

    async def _describe_workers(self) -> list[dict[str, Any]]:
        async def describe(name: str, worker: Any) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(worker.describe.remote(), timeout=5.0)
            except (TimeoutError, ray.exceptions.RayError) as error:
                return {"name": name, "ready": False, "error": type(error).__name__}

        return list(await asyncio.gather(*(describe(name, worker) for name, worker in self._workers.items())))

    async def _model_cards(self) -> list[dict[str, Any]]:
        routes = await self._call(self._resolver.routes.remote())
        return model_cards(routes, self._node["peer_id"], int(self._started))

    async def _generate(
        self, body: ChatCompletionBody | CompletionBody, endpoint: str, request: Request
    ) -> Response:
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        served = RequestTally(f"{prefix}-{uuid.uuid4().hex}", endpoint, body.model)
        self._metrics.in_flight.inc()
        try:
            body.check_supported()
            routes = await self._routes(body.model, body.mycellm, "chat")
            generation = body.to_request(served.request_id, routes[0].model.name)
            if body.stream:
                first, route = await self._open(generation, routes, served)
                stream = self._stream(body, generation, route, first, served, request, routes)
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers=self._route_headers(route)
                )
            result, route = await self._complete(generation, routes, served)
        except BaseException as error:
            served.fail(error)
            self._finish(served)
            raise
        served.prompt_tokens, served.completion_tokens = (
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
        )
        self._finish(served)
        extra = {"mycellm": self._route_info(route)}
        payload = (chat_completion_json if endpoint == "chat" else completion_json)(
            served.request_id, route.model.name, result, extra
        )
        return JSONResponse(payload, headers=self._route_headers(route))

    def _served_by(self, route: Route) -> str:
        return route.target if route.kind == "peer" else self._node["peer_id"]

    def _route_info(self, route: Route) -> dict[str, Any]:
        return {"route": route.kind, "target": route.target, "served_by": self._served_by(route)}

    def _route_headers(self, route: Route) -> dict[str, str]:
        return {
            "X-Mycellm-Routed-To": self._served_by(route),
            "X-Mycellm-Route": f"{route.kind}:{route.target}",
        }

    async def _try_routes(self, routes: list[Route], served: RequestTally, call: Any) -> tuple[Any, Route]:
        """Run ``call(target, route)`` on the best route; on a route failure move to the next one."""
        last_error: MycellmError | None = None
        for route in routes:
            served.route, served.model = route, route.model.name
            try:
                return await call(self._target(route), route), route
            except EngineError as error:
                logger.warning(
                    "route %s:%s failed before output: %s", route.kind, route.target, error.message
                )
                last_error = error
                self._route_table = None  # the table may be stale: refresh it on the next request
        raise last_error or NoRouteError("no route could serve the request")

    async def _open(
        self, generation: GenerationRequest, routes: list[Route], served: RequestTally
    ) -> tuple[GenerationChunk, Route]:
        async def open_on(target: RouteTarget, route: Route) -> GenerationChunk:
            request = generation.model_copy(update={"model": route.model.name})
            try:
                return await self._call(target.open(request, self._timeout_s))
            except asyncio.CancelledError:
                target.cancel(generation.request_id)
                raise

        first, route = await self._try_routes(routes, served, open_on)
        served.mark_first_token()
        return first, route

    async def _complete(
        self, generation: GenerationRequest, routes: list[Route], served: RequestTally
    ) -> Any:
        async def complete_on(target: RouteTarget, route: Route) -> Any:
            request = generation.model_copy(update={"model": route.model.name})
            try:
                return await self._call(target.complete(request))
            except asyncio.CancelledError:
                target.cancel(generation.request_id)
                raise

        return await self._try_routes(routes, served, complete_on)

    async def _resume(
        self,
        generation: GenerationRequest,
        produced: str,
        routes: list[Route],
        served: RequestTally,
        attempt: int,
    ) -> tuple[GenerationChunk, Route, GenerationRequest]:
        """Continue a broken stream on the next routes from the text already sent to the client."""
        resumed = generation.model_copy(
            update={"request_id": f"{generation.request_id}-r{attempt}", "continuation": produced}
        )
        first, route = await self._open(resumed, routes, served)
        return first, route, resumed

    async def _stream(
        self,
        body: ChatCompletionBody | CompletionBody,
        generation: GenerationRequest,
        route: Route,
        first: GenerationChunk,
        served: RequestTally,
        request: Request,
        routes: list[Route],
    ) -> AsyncIterator[bytes]:
        target = self._target(route)
        model, request_id, created = route.model.name, generation.request_id, int(time.time())
        current = generation.request_id  # the id the serving route knows this stream by
        chat = isinstance(body, ChatCompletionBody)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk: GenerationChunk | None = first
        produced: list[str] = []
        tool_calls_sent = False
        remaining = [candidate for candidate in routes if candidate != route]
        checked_at = time.monotonic()
        finished = False
        try:
            if chat:
                yield _sse(
                    chat_chunk_json(request_id, model, created, None, role=True)
                    | {"mycellm": self._route_info(route)}
                )
            while True:
                if chunk is not None:
                    if chunk.text or chunk.tool_calls or chunk.finish_reason:
                        produced.append(chunk.text)
                        tool_calls_sent = tool_calls_sent or bool(chunk.tool_calls)
                        payload = (
                            chat_chunk_json(request_id, model, created, chunk)
                            if chat
                            else completion_chunk_json(request_id, model, created, chunk)
                        )
                        yield _sse(payload)
                    if chunk.finish_reason is not None:
                        finished = True
                        if chunk.usage is not None:
                            served.prompt_tokens = chunk.usage.prompt_tokens
                            served.completion_tokens = chunk.usage.completion_tokens
                            if include_usage:
                                name = "chat.completion.chunk" if chat else "text_completion"
                                yield _sse(usage_chunk_json(request_id, model, created, chunk.usage, name))
                        break
                # A client that left is not always noticed by the proxy while we wait on the
                # worker; asking a few times a second makes the cancellation prompt and cheap.
                now = time.monotonic()
                if now - checked_at > DISCONNECT_CHECK_S:
                    checked_at = now
                    if await request.is_disconnected():
                        served.fail(RequestCancelledError(f"client left {request_id}"))
                        return
                try:
                    chunk = await self._call(target.pull(current, 30.0))
                except EngineError as error:
                    # The route broke mid-stream: go on from the text sent so far on the next route.
                    if not remaining or tool_calls_sent:
                        raise
                    logger.warning(
                        "route %s:%s broke mid-stream: %s", route.kind, route.target, error.message
                    )
                    self._route_table = None
                    attempt = len(routes) - len(remaining)
                    chunk, route, resumed = await self._resume(
                        generation, "".join(produced), remaining, served, attempt
                    )
                    remaining = remaining[remaining.index(route) + 1 :]
                    target, current = self._target(route), resumed.request_id
            yield b"data: [DONE]\n\n"
        except RequestCancelledError as error:
            # The client is gone (Serve cancelled our calls): nobody reads what we would send, and a
            # yield here could wait for a reader that never comes, so the record would be lost.
            served.fail(error)
        except MycellmError as error:
            served.fail(error)
            yield _sse(error.to_openai())
            yield b"data: [DONE]\n\n"
        except BaseException as error:  # the client went away (cancellation) or the stream broke
            served.fail(error)
            raise
        finally:
            # Record first: the rest of this block may run while the task is being torn down.
            self._finish(served)
            if not finished:
                try:
                    target.cancel(current)
                except Exception as error:  # best effort; the worker's idle reaper is the backstop
                    logger.warning("could not cancel %s: %s", current, error)

    def _finish(self, served: RequestTally) -> None:
        record = served.to_record()
        self._metrics.observe(served, record.route_kind if record else "none")
        if record is not None:  # None: rejected before routing, nothing was served
            self._records.put_nowait(record)
            if self._recorder is None or self._recorder.done():
                # A task of its own, in a context of its own: a call made from the request's task
                # is cancelled with the request when its client leaves, and the record was lost.
                self._recorder = asyncio.get_running_loop().create_task(
                    self._record_loop(), context=contextvars.Context()
                )

    async def _record_loop(self) -> None:
        """Hand records to the Ledger off the response path, one after another."""
        while not self._records.empty():
            record = self._records.get_nowait()
            try:
                await asyncio.wait_for(self._ledger.record_request.remote(record), timeout=30.0)
            except (TimeoutError, ray.exceptions.RayError) as error:
                logger.warning("could not record %s: %s", record.request_id, error)
