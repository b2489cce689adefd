"""Ray Serve ingress of a node: thin HTTP routes for the OpenAI API, the node API, /health, /metrics.

Routes read the request, call ``mycellm.api.serving`` (failover, resume, usage: Ray-free) or an
actor, and choose the HTTP status. ``deploy`` puts the ingress in front of a node's actors and
``run_node`` runs a whole node in the foreground (what ``mycellm serve`` calls).
"""

import asyncio
import logging
import time
from typing import Annotated, Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.routing import Route as StarletteRoute

from actors import node as node_runner
from actors.builders import APP_NAME, Node
from actors.calls import call_actor
from actors.placement import home_resource
from actors.recorder import Recorder
from actors.targets import WorkerHandles, route_target
from mycellm import __version__
from mycellm.api.auth import Caller, KeyGate, error_headers
from mycellm.api.budgets import BudgetKeeper
from mycellm.api.keys import KeyCreateBody, key_view
from mycellm.api.metrics import NodeMetrics
from mycellm.api.model_cards import model_cards
from mycellm.api.networks import NETWORK_HEADER, choose_network
from mycellm.api.openai import ChatCompletionBody, CompletionBody, EmbeddingBody, parse_body
from mycellm.api.openapi import (
    account_query,
    install_document,
    key_id_path,
    limit_query,
    network_query,
    offset_query,
    role_query,
    route_doc,
)
from mycellm.api.query_checks import account_param, check_network, check_page, check_role
from mycellm.api.responses import error_json
from mycellm.api.serving import MISS_REFRESH_S, Answer, NodeServing
from mycellm.api.tally import RequestTally
from mycellm.config import NodeSettings
from mycellm.errors import ModelNotFoundError, MycellmError, NetworkNotFoundError
from mycellm.identity.keys import NodeIdentity
from mycellm.ledger.pricing import PriceTable
from mycellm.routing.directory import RouteSnapshot

logger = logging.getLogger("mycellm.serve")

app = FastAPI(title="mycellm", version=__version__, docs_url=None, redoc_url=None)
install_document(app)


@app.exception_handler(MycellmError)
async def _mycellm_error(request: Request, error: MycellmError) -> JSONResponse:
    return JSONResponse(error.to_openai(), status_code=error.status, headers=error_headers(error))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return JSONResponse(
        error_json(f"{field}: {first['msg']}", "invalid_request_error", field), status_code=400
    )


def _allowed_methods(routes: list[Any], scope: Any) -> set[str]:
    """The methods of every route of ``scope``'s path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in routes:
        if hasattr(route, "original_router"):  # Serve's ingress includes the class's routes
            methods |= _allowed_methods(route.original_router.routes, scope)
        elif isinstance(route, StarletteRoute) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return methods


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    headers = error.headers
    if error.status_code == 405:  # the Allow header (RFC 9110) lists every method of the path
        headers = {"Allow": ", ".join(sorted(_allowed_methods(app.routes, request.scope)))}
    return JSONResponse(error_json(str(error.detail), kind), status_code=error.status_code, headers=headers)


class NodeIngress:
    """The HTTP ingress of one node; made a Serve deployment by ``build_app``."""

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
        self._workers = WorkerHandles(workers, node["namespace"])
        self._peer_manager = peer_manager
        self._timeout_s = float(node.get("request_timeout_s", 600.0))
        self._started = time.time()
        self._metrics = NodeMetrics()
        self._recorder = Recorder(ledger)
        self._gate = KeyGate(node["auth"], node["host"], self._load_keys)
        self._budgets = BudgetKeeper(PriceTable(node["credits"]), self._reserve, self._settle)
        self._serving = NodeServing(
            node_peer_id=node["peer_id"],
            route_table=self._route_table,
            target_for=lambda route: route_target(route, self._workers, peer_manager, self._timeout_s),
            on_finished=self._finished,
            open_wait_s=self._timeout_s,
            on_started=lambda served: self._metrics.in_flight.inc(),
            budgets=self._budgets,
        )

    # -- OpenAI API ---------------------------------------------------------------------------

    @app.post("/v1/chat/completions", **route_doc("chat_completions"))
    async def chat_completions(self, request: Request) -> Response:
        caller = await self._admit(request, "chat_completions")
        body = parse_body(await request.body(), ChatCompletionBody)
        network = request.headers.get(NETWORK_HEADER)
        return self._respond(await self._serving.generate(body, request.is_disconnected, caller, network))

    @app.post("/v1/completions", **route_doc("completions"))
    async def completions(self, request: Request) -> Response:
        caller = await self._admit(request, "completions")
        body = parse_body(await request.body(), CompletionBody)
        network = request.headers.get(NETWORK_HEADER)
        return self._respond(await self._serving.generate(body, request.is_disconnected, caller, network))

    @app.post("/v1/embeddings", **route_doc("embeddings"))
    async def embeddings(self, request: Request) -> Response:
        caller = await self._admit(request, "embeddings")
        body = parse_body(await request.body(), EmbeddingBody)
        return self._respond(await self._serving.embed(body, caller, request.headers.get(NETWORK_HEADER)))

    @app.get("/v1/models", **route_doc("list_models"))
    async def list_models(self, request: Request) -> JSONResponse:
        caller = await self._admit(request, "list_models")
        return JSONResponse({"object": "list", "data": await self._model_cards(caller, request)})

    @app.get("/v1/models/{model_id:path}", **route_doc("get_model"))
    async def get_model(self, request: Request, model_id: str) -> JSONResponse:
        caller = await self._admit(request, "get_model")
        for card in await self._model_cards(caller, request):
            if card["id"] == model_id:
                return JSONResponse(card)
        raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")

    # -- node API -------------------------------------------------------------------------------

    @app.get("/health", **route_doc("health"))
    async def health(self) -> JSONResponse:
        workers = await self._describe_workers()
        # A relay (no local model) is healthy with no workers; a node with workers needs them ready.
        ready = all(worker.get("ready") for worker in workers)
        return JSONResponse(
            {"status": "ok" if ready else "degraded", "workers": len(workers)},
            status_code=200 if ready else 503,
        )

    @app.get("/v1/node/status", **route_doc("node_status"))
    async def node_status(self, request: Request) -> JSONResponse:
        await self._admit(request, "node_status")
        workers = await self._describe_workers()
        totals = await self._call_actor(self._ledger.totals.remote())
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

    @app.get("/v1/node/requests", **route_doc("node_requests"))
    async def node_requests(
        self, request: Request, limit: Annotated[int, limit_query()] = 50
    ) -> JSONResponse:
        await self._admit(request, "node_requests")
        check_page(limit)
        records = await self._call_actor(self._ledger.recent_requests.remote(limit))
        return JSONResponse(
            {"object": "list", "data": [record.model_dump(mode="json") for record in records]}
        )

    @app.get("/v1/node/credits", **route_doc("node_credits"))
    async def node_credits(
        self,
        request: Request,
        account: Annotated[str | None, account_query("An account id; the node's own when absent")] = None,
        limit: Annotated[int, limit_query()] = 20,
        network: Annotated[str | None, network_query()] = None,
    ) -> JSONResponse:
        caller = await self._admit(request, "node_credits")
        account_id = account_param(account) or self._node["account_id"]
        check_page(limit)
        book = await self._books(caller, network)
        return JSONResponse(await self._call_actor(self._ledger.credits_view.remote(account_id, limit, book)))

    @app.get("/v1/node/receipts", **route_doc("node_receipts"))
    async def node_receipts(
        self,
        request: Request,
        limit: Annotated[int, limit_query()] = 50,
        offset: Annotated[int, offset_query()] = 0,
        account: Annotated[str | None, account_query("Only receipts of this account")] = None,
        role: Annotated[str, role_query()] = "any",
        model: str | None = None,
        network: Annotated[str | None, network_query()] = None,
    ) -> JSONResponse:
        caller = await self._admit(request, "node_receipts")
        check_page(limit, offset)
        check_role(role)
        book = await self._books(caller, network)
        page = await self._call_actor(
            self._ledger.receipts.remote(limit, offset, account_param(account), role, model, book)
        )
        return JSONResponse({"object": "list", "data": page, "limit": limit, "offset": offset})

    @app.get("/v1/node/peers", **route_doc("node_peers"))
    async def node_peers(self, request: Request) -> JSONResponse:
        await self._admit(request, "node_peers")
        if self._peer_manager is None:
            return JSONResponse({"object": "list", "data": [], "connected": []})
        view = await self._call_actor(self._peer_manager.describe.remote())
        return JSONResponse({"object": "list", "data": view.pop("peers"), **view})

    @app.get("/metrics", **route_doc("metrics"))
    async def metrics(self, request: Request) -> Response:
        await self._admit(request, "metrics")
        return Response(self._metrics.render(), media_type=self._metrics.content_type)

    # -- API keys (admin) -----------------------------------------------------------------------

    @app.get("/v1/node/keys", **route_doc("list_keys"))
    async def list_keys(self, request: Request) -> JSONResponse:
        await self._admit(request, "list_keys")
        records = await self._call_actor(self._ledger.api_keys.remote())
        now = time.time()
        return JSONResponse({"object": "list", "data": [key_view(record, now) for record in records]})

    @app.post("/v1/node/keys", **route_doc("create_key"))
    async def create_key(self, request: Request) -> JSONResponse:
        await self._admit(request, "create_key")
        body = parse_body(await request.body(), KeyCreateBody)
        if body.network is not None:  # kept by id: a name may be ambiguous later
            entry = (await self._serving.snapshot()).network(body.network, "network")
            body = body.model_copy(update={"network": entry.network_id})
        now = time.time()
        text, record = body.mint(now)
        await self._call_actor(self._ledger.create_api_key.remote(record))
        self._gate.forget()
        return JSONResponse(key_view(record, now) | {"key": text})

    @app.delete("/v1/node/keys/{key_id}", **route_doc("revoke_key"))
    async def revoke_key(self, request: Request, key_id: Annotated[str, key_id_path()]) -> JSONResponse:
        await self._admit(request, "revoke_key")
        record = await self._call_actor(self._ledger.revoke_api_key.remote(key_id))
        self._gate.forget()
        return JSONResponse(key_view(record, time.time()))

    # -- internals ------------------------------------------------------------------------------

    async def _admit(self, request: Request, route: str) -> Caller:
        source = request.client.host if request.client is not None else "unknown"
        return await self._gate.admit(request.headers, source, route)

    async def _load_keys(self, used: dict[str, float]) -> Any:
        return await self._call_actor(self._ledger.api_keys.remote(used))

    async def _reserve(self, key_id: str, request_id: str, amount: int, now: float) -> bool:
        return bool(
            await self._call_actor(self._ledger.reserve_budget.remote(key_id, request_id, amount, now))
        )

    async def _settle(self, key_id: str, request_id: str, actual: int, now: float, reserved: bool) -> bool:
        settled = self._ledger.settle_budget.remote(key_id, request_id, actual, now, reserved)
        return bool(await self._call_actor(settled))

    async def _call_actor(self, reference: Any) -> Any:
        return await call_actor(reference, self._timeout_s)

    async def _route_table(self) -> RouteSnapshot:
        snapshot: RouteSnapshot = await self._call_actor(self._resolver.snapshot.remote())
        return snapshot

    async def _books(self, caller: Caller, asked: str | None) -> str:
        """The network whose books a credits or receipts read shows (the query's, the key's, the default)."""
        network = choose_network(await self._serving.snapshot(), caller, check_network(asked))
        if network is None:
            raise NetworkNotFoundError(
                "this node is in no network yet, so it keeps no credits: create one or join one"
                " (mycellm network create | join)",
                param="network",
            )
        return network.network_id

    def _respond(self, answer: Answer) -> Response:
        headers = {
            "X-Mycellm-Routed-To": answer.served_by,
            "X-Mycellm-Route": f"{answer.route.kind}:{answer.route.target}",
        }
        if answer.events is not None:
            return StreamingResponse(answer.events, media_type="text/event-stream", headers=headers)
        return JSONResponse(answer.payload, headers=headers)

    def _finished(self, served: RequestTally) -> None:
        record = served.to_record()
        self._metrics.observe(served, record.route_kind if record else "none")
        if record is not None:  # None: rejected before routing, nothing was served
            self._recorder.record(record)

    async def _describe_workers(self) -> list[dict[str, Any]]:
        async def describe(name: str, worker: Any) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(worker.describe.remote(), timeout=5.0)
            except (TimeoutError, ray.exceptions.RayError) as error:
                return {"name": name, "ready": False, "error": type(error).__name__}

        # The workers started with the node, and those of machines that joined since (their routes).
        routes = (await self._serving.snapshot()).routes
        names = dict.fromkeys([*self._workers.names(), *(r.target for r in routes if r.kind == "local")])
        found = [(name, worker) for name in names if (worker := self._workers.get(name)) is not None]
        return list(await asyncio.gather(*(describe(name, worker) for name, worker in found)))

    async def _model_cards(
        self, caller: Caller | None = None, request: Request | None = None
    ) -> list[dict[str, Any]]:
        header = request.headers.get(NETWORK_HEADER) if request is not None else None
        network = await self._serving.network(caller, None, header)
        routes = (await self._serving.snapshot(MISS_REFRESH_S)).routes_of(network)  # a listing: fresh
        return model_cards(routes, self._node["peer_id"], int(self._started))


def build_app(ingress: type[NodeIngress] = NodeIngress) -> Any:
    """The Serve deployment of the ingress class (the one place Serve's decorators are applied)."""
    return serve.deployment(name="NodeIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)(
        serve.ingress(app)(ingress)
    )


# Built at import: a replica imports this module, and Serve binds the routes' ``self`` while it
# decorates the class, so the replica must decorate it too.
INGRESS = build_app()


def deploy(node: Node, settings: NodeSettings, identity: NodeIdentity) -> None:
    """Start Serve's HTTP proxy and put the ingress in front of ``node``'s actors."""
    # The HTTP proxy and the ingress run on the node's own machine only: a machine of its cluster
    # that leaves takes none of the HTTP side with it (and two raylets of one host share its port).
    serve.start(proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.port})
    node_info = {
        "peer_id": identity.peer_id,
        "account_id": identity.account_id,
        "node_name": settings.node_name,
        "namespace": settings.ray_namespace,
        "request_timeout_s": settings.request_timeout_s,
        "quic_port": node.quic_port,
        "host": settings.host,
        "auth": settings.auth,
        "credits": settings.credits,
    }
    serve.run(
        INGRESS.options(ray_actor_options={"num_cpus": 0, "resources": {home_resource(): 0.001}}).bind(
            node_info, node.resolver, node.ledger, node.workers, node.peer_manager
        ),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )


def run_node(settings: NodeSettings) -> int:
    """Run a node in the foreground until SIGINT/SIGTERM (``mycellm serve``)."""
    return node_runner.run_node(settings, deploy)
