"""The node's OpenAPI document: its shape, and schemathesis with every check against a live node."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig

from mycellm.api.metrics import NodeMetrics
from mycellm.api.openapi import ERROR_SCHEMA_NAME, MAX_OFFSET, SCHEMAS
from mycellm.api.responses import error_json

# -- the document, without a node ---------------------------------------------------------------

GENERATION = ("/v1/chat/completions", "/v1/completions")
BODIES = {
    "/v1/chat/completions": "ChatCompletionBody",
    "/v1/completions": "CompletionBody",
    "/v1/embeddings": "EmbeddingBody",
}
# Every operation that needs a key also answers 401 (no or a bad key), 403 (scope) and 429 (rate, lockout).
AUTH = {"401", "403", "429"}
ERROR_STATUSES = {
    ("post", "/v1/chat/completions"): {"400", "402", "404", "422", "503"} | AUTH,
    ("post", "/v1/completions"): {"400", "402", "404", "422", "503"} | AUTH,
    ("post", "/v1/embeddings"): {"400", "402", "404", "422", "503"} | AUTH,
    ("get", "/v1/models"): {"400", "404", "503"} | AUTH,
    ("get", "/v1/models/{model_id}"): {"400", "404", "503"} | AUTH,
    ("get", "/v1/node/status"): {"503"} | AUTH,
    ("get", "/v1/node/requests"): {"400", "503"} | AUTH,
    ("get", "/v1/node/credits"): {"400", "404", "503"} | AUTH,
    ("get", "/v1/node/receipts"): {"400", "404", "503"} | AUTH,
    ("get", "/v1/node/peers"): {"503"} | AUTH,
    ("get", "/metrics"): AUTH,
    ("get", "/v1/node/keys"): {"503"} | AUTH,
    ("post", "/v1/node/keys"): {"400", "404", "503"} | AUTH,
    ("delete", "/v1/node/keys/{key_id}"): {"400", "404", "503"} | AUTH,
}
SCOPES = {
    "/v1/chat/completions": "inference",
    "/v1/completions": "inference",
    "/v1/embeddings": "inference",
    "/v1/models": "inference",
    "/v1/models/{model_id}": "inference",
    "/metrics": "read",
    "/v1/node/keys": "admin",
    "/v1/node/keys/{key_id}": "admin",
}


def served_document() -> dict[str, Any]:
    """The document the node serves at /openapi.json, built here from the same routes."""
    import serve_app  # imports Ray; no cluster is started

    return copy.deepcopy(serve_app.app.openapi())


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return served_document()


def validator(document: dict[str, Any], name: str) -> Any:
    return jsonschema_rs.validator_for({"$ref": SCHEMAS + name, "components": document["components"]})


def api_paths(routes: list[Any]) -> set[str]:
    """The paths of the API's routes (Serve's ingress mounts them in an included router)."""
    paths = set()
    for route in routes:
        if hasattr(route, "original_router"):
            paths |= api_paths(route.original_router.routes)
        elif isinstance(route, APIRoute):
            paths.add(route.path.replace(":path", ""))
    return paths


def test_every_route_is_documented(document: dict[str, Any]) -> None:
    import serve_app

    assert api_paths(serve_app.app.routes) == set(document["paths"])
    operations = [
        (method, path, op) for path, item in document["paths"].items() for method, op in item.items()
    ]
    assert len(operations) == len(ERROR_STATUSES) + 1  # and /health
    for method, path, operation in operations:
        assert operation["summary"] and operation["operationId"][0].islower()
        assert "200" in operation["responses"]
        statuses = set(operation["responses"]) - {"200"}
        if path == "/health":
            assert statuses == {"503"}
            continue
        assert statuses == ERROR_STATUSES[(method, path)], path
        for status in statuses:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": SCHEMAS + ERROR_SCHEMA_NAME}


def test_every_operation_names_its_scope_and_security(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == schemes["bearerAuth"] | {"type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == schemes["apiKeyHeader"] | {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    for path, item in document["paths"].items():
        for operation in item.values():
            if path == "/health":  # a liveness probe: open
                assert operation["security"] == [] and "x-mycellm-scope" not in operation
                continue
            scope = SCOPES.get(path, "read" if path.startswith("/v1/node/") else None)
            assert operation["x-mycellm-scope"] == scope, path
            assert operation["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
            assert set(operation["responses"]["429"]["headers"]) == {"Retry-After"}
            assert set(operation["responses"]["401"]["headers"]) == {"WWW-Authenticate"}


def test_request_bodies_are_the_pydantic_models(document: dict[str, Any]) -> None:
    for path, name in BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": SCHEMAS + name}
        schema = document["components"]["schemas"][name]
        assert schema["additionalProperties"] is True, "bodies stay lenient about unknown fields"
    chat = document["components"]["schemas"]["ChatCompletionBody"]["properties"]
    assert chat["n"]["maximum"] == 1  # n > 1 is refused
    assert chat["stop"]["maxItems"] == 4
    completion = validator(document, "CompletionBody")
    assert completion.is_valid({"model": "auto", "prompt": "Once"})
    assert not completion.is_valid({"model": "auto", "prompt": ["a", "b"]})
    assert not completion.is_valid({"model": "auto", "prompt": "Once", "best_of": 2})
    embedding = validator(document, "EmbeddingBody")
    assert embedding.is_valid({"model": "auto", "input": [[17, 18], [19]]})
    assert not embedding.is_valid({"model": "auto", "input": []})


def schema_keywords(schema: Any) -> set[str]:
    """Every keyword used in ``schema`` (property names are not keywords)."""
    if isinstance(schema, list):
        return set().union(*(schema_keywords(item) for item in schema))
    if not isinstance(schema, dict):
        return set()
    keywords = set(schema)
    for key, value in schema.items():
        children = value.values() if key in ("properties", "paths", "schemas", "responses") else [value]
        keywords |= set().union(*(schema_keywords(child) for child in children))
    return keywords


def test_bounds_are_json_schema_keywords(document: dict[str, Any]) -> None:
    # A constraint pydantic cannot express lands in the schema as its own name (ge, le), which
    # no JSON Schema tool reads.
    assert not schema_keywords(document) & {"ge", "le", "gt", "lt", "min_length", "max_length"}


def test_errors_and_content_types(document: dict[str, Any]) -> None:
    assert validator(document, ERROR_SCHEMA_NAME).is_valid(error_json("bad", "invalid_request_error", "n"))
    assert not validator(document, ERROR_SCHEMA_NAME).is_valid({"detail": "bad"})
    for path in GENERATION:
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {NodeMetrics.content_type}
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_query_parameters_state_their_bounds(document: dict[str, Any]) -> None:
    parameters = {
        (path, parameter["name"]): parameter["schema"]
        for path, item in document["paths"].items()
        if "get" in item
        for parameter in item["get"].get("parameters", [])
    }
    for path in ("/v1/node/requests", "/v1/node/credits", "/v1/node/receipts"):
        assert (parameters[(path, "limit")]["minimum"], parameters[(path, "limit")]["maximum"]) == (1, 1000)
    assert parameters[("/v1/node/receipts", "offset")]["maximum"] == MAX_OFFSET
    assert parameters[("/v1/node/receipts", "role")]["enum"] == ["any", "consumer", "seeder"]
    assert parameters[("/v1/node/credits", "account")]["anyOf"] == [
        {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    ]


# -- schemathesis against the live node ---------------------------------------------------------

# Each generated case is one real request; a generation is a real SmolLM2 generation.
MAX_EXAMPLES = 6
GENERATED_TOKENS = 4
EMBEDDED_INPUTS = 8
MAX_INPUTS = 2048
# SmolLM2's vocabulary: ids 0-16 are its special tokens, 49152 its size.
ORDINARY_TOKENS = range(17, 49152)


def fit_to_node(case: Any) -> None:
    """Adapt a generated body to what the served model and engine take, where the document cannot say.

    - Time: generations get at most GENERATED_TOKENS (the document allows any max_tokens >= 1),
      embeddings at most EMBEDDED_INPUTS inputs or token ids (the document allows 2048 inputs).
    - The model: token ids are mapped into SmolLM2's ordinary tokens. An id past its vocabulary
      is refused with 400, and an input of special tokens only detokenizes to no text, on which
      the llama.cpp engine fails (503); a long token list would pass its context window.
    - The engine: a forced tool call names one of the request's tools (llama.cpp refuses
      "required" with several), and JSON Schemas inside a request become {"type": "object"}:
      llama.cpp's grammar converter fails (503) on schemas it does not recognise.
    Values the document forbids (negative cases) are left alone; schemathesis checks the case
    again as sent.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    body = copy.deepcopy(body)
    if case.operation.path in GENERATION:
        _bound_generation(body)
        _fit_tools(body)
    if case.operation.path == "/v1/embeddings":
        body["input"] = _ordinary_tokens(_few_inputs(body.get("input")))
    case.body = body


def _is_count(value: object) -> bool:
    """A JSON integer (schemathesis also draws integral floats such as 3.0)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


def _bound_generation(body: dict[str, Any]) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if _is_count(value) and value > GENERATED_TOKENS:
            body[key] = GENERATED_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = GENERATED_TOKENS


def _fit_tools(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    json_schema = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if isinstance(json_schema, dict) and isinstance(json_schema.get("schema"), dict):
        json_schema["schema"] = {"type": "object"}
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            names.append(function.get("name"))
            if isinstance(function.get("parameters"), dict):
                function["parameters"] = {"type": "object"}
    choice = body.get("tool_choice")
    if choice == "required":
        body["tools"] = tools[:1]
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and names:
        choice["function"]["name"] = names[0]


def _few_inputs(value: Any) -> Any:
    if not isinstance(value, list) or len(value) <= EMBEDDED_INPUTS:
        return value
    if len(value) > MAX_INPUTS and not all(_is_count(item) for item in value):
        return value  # too many inputs: the document forbids it
    return value[:EMBEDDED_INPUTS]


def _ordinary_tokens(value: Any) -> Any:
    if _is_count(value) and value >= 0:
        return ORDINARY_TOKENS[int(value) % len(ORDINARY_TOKENS)]
    if isinstance(value, list):
        return [_ordinary_tokens(item) for item in value]
    return value


def fuzzing_config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 20260101,
            "checks": {
                # 402 and 422 answer a valid request the network cannot serve now (no credits; no
                # route with the asked tier or tags); 400 stays a schema rejection.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "402", "403", "404", "422", "5xx"]
                },
                # The fuzzed node accepts callers without a key (auth.allow_anonymous: true, the
                # session node of conftest.py), so a request without credentials succeeds where the
                # document asks for a key; tests/test_node_api_keys.py checks the enforcement.
                "ignored_auth": {"enabled": False},
            },
            "generation": {"max-examples": MAX_EXAMPLES},
        }
    )


# Built at collection: schemathesis makes one test per operation. test_node_serves_this_document
# checks that the node serves this very document.
fuzzed = schemathesis.openapi.from_dict(served_document(), config=fuzzing_config())


@pytest.mark.node
def test_node_serves_this_document(node: Any) -> None:
    assert httpx.get(f"{node.url}/openapi.json", timeout=10).json() == served_document()


@pytest.mark.node
@fuzzed.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_node_conforms_to_its_document(case: Any, node: Any) -> None:
    fit_to_node(case)
    case.call_and_validate(base_url=node.url, timeout=60)


@pytest.mark.node
def test_wrong_method_and_unknown_path(node: Any) -> None:
    wrong = httpx.request("TRACE", f"{node.url}/v1/models", timeout=10)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{node.url}/v1/nothing-here", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


@pytest.mark.node
def test_node_follows_its_links(node: Any) -> None:
    """Schemathesis' stateful phase: request sequences along the links it infers (list, then get)."""

    class NodeMachine(fuzzed.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            fit_to_node(case)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": node.url, "timeout": 60}

    NodeMachine.run(
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=4,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
