"""The OpenAPI document of a node's HTTP API: bodies, parameters, statuses, content types, error shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Path, Query
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from mycellm.api.keys import KEY_ID_PATTERN, ROUTE_SCOPES, KeyCreateBody
from mycellm.api.metrics import NodeMetrics
from mycellm.api.openai import ChatCompletionBody, CompletionBody, EmbeddingBody
from mycellm.api.schemas import ERROR_SCHEMA_NAME, RESPONSE_SCHEMAS, SCHEMAS, STRING, json_object, ref

BODY_MODELS = (ChatCompletionBody, CompletionBody, EmbeddingBody, KeyCreateBody)
MAX_PAGE = 1000
# Offsets are bound as SQL integers: SQLite and PostgreSQL (BIGINT) stop at 2**63 - 1.
MAX_OFFSET = 2**63 - 1
ACCOUNT_PATTERN = r"^[0-9a-f]{64}$"
RECEIPT_ROLES = ("any", "consumer", "seeder")

DESCRIPTION = (
    "The OpenAI API of a mycellm node and its node API. Every error is an OpenAI error object; "
    "400 is the status of a request that is malformed or asks for something this node does not do. "
    "Callers present an API key (`Authorization: Bearer mck_...` or `X-API-Key: mck_...`) with the "
    "scope each operation names in `x-mycellm-scope` (inference, read, admin); a node bound to "
    "loopback without keys, or one configured with `auth.allow_anonymous: true`, also answers "
    "callers without one. /health and this document are open to anyone."
)

SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "A mycellm API key (mck_...)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key"},
}
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}
}
_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}


_ERRORS = {
    400: "Malformed, or asks for what this node does not support (n > 1, a prompt over the context "
    "window, a token id outside the vocabulary, a tool_choice naming no tool); `param` names the field",
    401: "No API key, or one that is unknown, wrong, revoked or expired",
    402: "The consumer's balance does not cover the price of a peer's answer, or the API key's daily "
    "budget does not cover the request's worst-case price (code budget_exceeded), before any work",
    403: "The API key lacks the scope this operation needs (x-mycellm-scope)",
    404: "No route of the network serves the model, or the network named (API key, `mycellm.network`,"
    " X-Mycellm-Network) is none of this node's (code network_not_found)",
    422: "No route satisfies the routing options (`mycellm`)",
    429: "The API key is over its requests per minute, or this address failed to authenticate too often",
    503: "An engine, peer or actor failed, timed out or is not ready",
}
_GENERATION_ERRORS = (400, 402, 404, 422, 503)


def _events(chunk: str) -> dict[str, Any]:
    """Server-sent events, each described as an event (OpenAPI 3.1): chunks, an error, then [DONE]."""
    data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(chunk), ref(ERROR_SCHEMA_NAME)]},
    }
    event = json_object(["data"], {"data": {"anyOf": [{"const": "[DONE]"}, data]}})
    return {"schema": event | {"description": "One event: a chunk, an error that ends the stream, or [DONE]"}}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or _ERRORS[status],
        "content": {"application/json": {"schema": ref(ERROR_SCHEMA_NAME)}},
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def _route(
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    errors: dict[int, dict[str, Any]],
    *,
    tag: str = "node",
    body: str | None = None,
) -> dict[str, Any]:
    declaration: dict[str, Any] = {
        "operation_id": operation_id,
        "summary": summary,
        "tags": [tag],
        "responses": {200: ok, **errors},
    }
    if body is not None:
        request_body = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
        declaration["openapi_extra"] = {"requestBody": request_body}
    return declaration


def _errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: _error(status) for status in statuses}


NETWORK_PARAMETER = {
    "name": "X-Mycellm-Network",
    "in": "header",
    "required": False,
    "description": "The network the request runs in (a name or an id); the API key's network wins,"
    " then the body's mycellm.network, then this header, then the node's default network",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}


def _in_a_network(declaration: dict[str, Any]) -> dict[str, Any]:
    extra = declaration.setdefault("openapi_extra", {})
    extra["parameters"] = [NETWORK_PARAMETER]
    return declaration


def _models(name: str, summary: str, ok: dict[str, Any], not_found: str) -> dict[str, Any]:
    errors = {400: _error(400), 404: _error(404, not_found), 503: _error(503)}
    return _in_a_network(_route(name, summary, ok, errors, tag="openai"))


def _generation(name: str, summary: str, body: str, result: str) -> dict[str, Any]:
    ok = _json(result, "The answer, or with stream its server-sent events")
    ok["content"]["text/event-stream"] = _events(result + "Chunk")
    return _in_a_network(_route(name, summary, ok, _errors(*_GENERATION_ERRORS), tag="openai", body=body))


class PrometheusResponse(Response):
    """The Prometheus text format, as /metrics sends it."""

    media_type = NodeMetrics.content_type


_METRICS_OK = {
    "description": "Prometheus metrics (mycellm_*)",
    "content": {NodeMetrics.content_type: {"schema": STRING}},
}
_NOT_FOUND = "No model with this id is served by the network, or the network is none of this node's"
_NO_NETWORK = "The network named is none of this node's (code network_not_found)"
_NO_BOOKS = "The network named is none of this node's, or the node is in no network yet (network_not_found)"

_KEY_NOT_FOUND = "No API key has this id"

ROUTES: dict[str, dict[str, Any]] = {
    "chat_completions": _generation(
        "createChatCompletion", "Chat completion", "ChatCompletionBody", "ChatCompletion"
    ),
    "completions": _generation("createCompletion", "Legacy completion", "CompletionBody", "TextCompletion"),
    "embeddings": _in_a_network(
        _route(
            "createEmbedding",
            "Embeddings",
            _json("EmbeddingList", "One vector per input"),
            _errors(*_GENERATION_ERRORS),
            tag="openai",
            body="EmbeddingBody",
        )
    ),
    "list_models": _models(
        "listModels", "Models the network serves", _json("ModelList", "Models"), _NO_NETWORK
    ),
    "get_model": _models("retrieveModel", "One model", _json("Model", "The model"), _NOT_FOUND),
    "health": _route(
        "health",
        "Health of the node's workers",
        _json("Health", "Every worker is ready (a relay has none)"),
        {503: _json("Health", "A worker is not ready")},
    ),
    "node_status": _route("nodeStatus", "The node", _json("NodeStatus", "The node"), _errors(503)),
    "node_requests": _route(
        "nodeRequests", "Recent requests", _json("ObjectList", "Newest first"), _errors(400, 503)
    ),
    "node_credits": _route(
        "nodeCredits",
        "Balance and transfers",
        _json("Credits", "The account's credits"),
        {400: _error(400), 404: _error(404, _NO_BOOKS), 503: _error(503)},
    ),
    "node_receipts": _route(
        "nodeReceipts",
        "Usage receipts",
        _json("ObjectList", "A page of receipts"),
        {400: _error(400), 404: _error(404, _NO_BOOKS), 503: _error(503)},
    ),
    "node_peers": _route("nodePeers", "Known peers", _json("ObjectList", "Peers and links"), _errors(503)),
    "metrics": _route("metrics", "Prometheus metrics", _METRICS_OK, {})
    | {"response_class": PrometheusResponse},
    "list_keys": _route(
        "listApiKeys", "API keys", _json("ApiKeyList", "Every key, without secrets"), _errors(503)
    ),
    "create_key": _route(
        "createApiKey",
        "Create an API key",
        _json("ApiKeyCreated", "The new key; its text is in no other answer"),
        {400: _error(400), 404: _error(404, _NO_NETWORK), 503: _error(503)},
        body="KeyCreateBody",
    ),
    "revoke_key": _route(
        "revokeApiKey",
        "Revoke an API key",
        _json("ApiKey", "The key, revoked"),
        {400: _error(400), 404: _error(404, _KEY_NOT_FOUND), 503: _error(503)},
    ),
}


def _auth_errors() -> dict[int, dict[str, Any]]:
    errors = _errors(401, 403, 429)
    errors[401]["headers"] = _CHALLENGE
    errors[429]["headers"] = _RETRY_AFTER
    return errors


def route_doc(name: str) -> dict[str, Any]:
    """Keyword arguments of FastAPI's route decorator that document the route ``name``: its
    statuses, and the key scope it needs (``ROUTE_SCOPES``, the same table the ingress enforces)."""
    declaration = dict(ROUTES[name])
    scope = ROUTE_SCOPES[name]
    extra = dict(declaration.get("openapi_extra", {}))
    if scope is None:
        extra["security"] = []
    else:
        extra |= {"security": SECURITY, "x-mycellm-scope": scope}
        declaration["responses"] = declaration["responses"] | _auth_errors()
    declaration["openapi_extra"] = extra
    return declaration


# Query parameters, as ``Annotated`` metadata: the routes check the values themselves (their own
# error messages), these state the same bounds in the document.


def limit_query() -> Any:
    return Query(description="Entries to return", json_schema_extra={"minimum": 1, "maximum": MAX_PAGE})


def offset_query() -> Any:
    return Query(description="Entries to skip", json_schema_extra={"minimum": 0, "maximum": MAX_OFFSET})


def account_query(description: str) -> Any:
    return Query(
        description=description,
        json_schema_extra={"anyOf": [{"type": "string", "pattern": ACCOUNT_PATTERN}]},
    )


def network_query() -> Any:
    return Query(
        description="A network's name or id; the API key's network, else the node's default, when absent",
        json_schema_extra={"minLength": 1, "maxLength": 128},
    )


def key_id_path() -> Any:
    return Path(description="The key's id (the hex after mck_)", pattern=KEY_ID_PATTERN)


def role_query() -> Any:
    return Query(description="Receipts where the account is", json_schema_extra={"enum": list(RECEIPT_ROLES)})


def body_schemas() -> dict[str, Any]:
    """JSON Schemas of the request bodies and the models they use, named as components."""
    _, definitions = models_json_schema(
        [(model, "validation") for model in BODY_MODELS], ref_template=SCHEMAS + "{model}"
    )
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


def _drop_framework_validation_errors(document: dict[str, Any]) -> None:
    # FastAPI declares a 422 for every route with parameters; this API answers bad input with 400.
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            content = operation.get("responses", {}).get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema") == ref("HTTPValidationError"):
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def build_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of ``app``'s routes, completed with the components the routes name."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=DESCRIPTION,
        routes=app.routes,
    )
    _drop_framework_validation_errors(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(body_schemas())
    schemas.update(RESPONSE_SCHEMAS)
    document["components"]["securitySchemes"] = SECURITY_SCHEMES
    return document


def install_document(app: FastAPI) -> None:
    """Serve ``build_document``'s document at ``app``'s /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
