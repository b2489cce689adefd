"""JSON Schemas of the node API's answers: the error shape, completions and chunks, embeddings, models, node views, keys."""

from __future__ import annotations

from typing import Any, get_args

from mycellm.api.keys import SCOPES
from mycellm.routing.ranking import RouteKind

SCHEMAS = "#/components/schemas/"
ERROR_SCHEMA_NAME = "ErrorResponse"


def ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def json_object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def list_of(items: dict[str, Any]) -> dict[str, Any]:
    return json_object(
        ["object", "data"], {"object": {"const": "list"}, "data": {"type": "array", "items": items}}
    )


INTEGER, STRING, NUMBER, OBJECT = ({"type": kind} for kind in ("integer", "string", "number", "object"))

ERROR_SCHEMA = json_object(
    ["error"],
    {
        "error": json_object(
            ["message", "type", "param", "code"],
            {
                "message": STRING,
                "type": STRING,
                "param": nullable("string") | {"description": "The request field at fault"},
                "code": nullable("string"),
            },
        )
    },
)

TOOL_CALL = json_object(
    ["id", "type", "function"],
    {
        "id": STRING,
        "type": {"const": "function"},
        "function": json_object(["name", "arguments"], {"name": STRING, "arguments": STRING}),
    },
)


def completion_schema(object_name: str, choice: dict[str, Any], *, chunk: bool = False) -> dict[str, Any]:
    """A completion, or with ``chunk`` one event of its stream (usage only in the last, if asked)."""
    return json_object(
        ["id", "object", "created", "model", "choices", *([] if chunk else ["usage"])],
        {
            "id": STRING,
            "object": {"const": object_name},
            "created": INTEGER,
            "model": STRING,
            "choices": {"type": "array", "items": json_object(["index", "finish_reason"], choice)},
            "usage": ref("Usage"),
            "mycellm": ref("RouteInfo"),
        },
    )


TEXT_CHOICE = {
    "index": INTEGER,
    "text": STRING,
    "finish_reason": nullable("string"),
    "logprobs": {"type": "null"},
}

_API_KEY_FIELDS: dict[str, Any] = {
    "object": {"const": "api_key"},
    "id": STRING,
    "name": STRING,
    "scopes": {"type": "array", "items": {"enum": list(SCOPES)}},
    "network": nullable("string")
    | {"description": "The network of the key's requests; null: the node's default"},
    "budget": nullable("number") | {"description": "Credits per UTC day; null: no budget"},
    "spent_today": NUMBER,
    "reserved": NUMBER | {"description": "Worst-case prices of the key's running requests"},
    "rpm": nullable("integer"),
    "created_at": NUMBER,
    "expires_at": nullable("number"),
    "revoked_at": nullable("number"),
    "last_used_at": nullable("number"),
    "active": {"type": "boolean"},
}
API_KEY = json_object(list(_API_KEY_FIELDS), _API_KEY_FIELDS) | {
    "description": "An API key, without its secret"
}

RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    ERROR_SCHEMA_NAME: ERROR_SCHEMA,
    "Usage": json_object(
        ["prompt_tokens", "completion_tokens", "total_tokens"],
        {"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
    ),
    "RouteInfo": json_object(
        ["route", "target", "served_by"],
        {"route": {"enum": list(get_args(RouteKind))}, "target": STRING, "served_by": STRING},
    ),
    "ChatCompletion": completion_schema(
        "chat.completion",
        {
            "index": INTEGER,
            "message": json_object(
                ["role", "content"],
                {
                    "role": {"const": "assistant"},
                    "content": nullable("string"),
                    "tool_calls": {"type": "array", "items": TOOL_CALL},
                },
            ),
            "finish_reason": nullable("string"),
            "logprobs": {"type": "null"},
        },
    ),
    "ChatCompletionChunk": completion_schema(
        "chat.completion.chunk",
        {
            "index": INTEGER,
            "delta": {
                "type": "object",
                "properties": {
                    "role": {"const": "assistant"},
                    "content": STRING,
                    "tool_calls": {"type": "array", "items": TOOL_CALL},
                },
            },
            "finish_reason": nullable("string"),
            "logprobs": {"type": "null"},
        },
        chunk=True,
    ),
    "TextCompletion": completion_schema("text_completion", TEXT_CHOICE),
    "TextCompletionChunk": completion_schema("text_completion", TEXT_CHOICE, chunk=True),
    "EmbeddingList": list_of(
        json_object(
            ["object", "index", "embedding"],
            {
                "object": {"const": "embedding"},
                "index": INTEGER,
                "embedding": {"anyOf": [{"type": "array", "items": NUMBER}, STRING]},
            },
        )
    )
    | {"description": "Vectors as floats, or as base64 of little-endian float32 with encoding_format base64"},
    "Model": json_object(
        ["id", "object", "created", "owned_by"],
        {
            "id": STRING,
            "object": {"const": "model"},
            "created": INTEGER,
            "owned_by": STRING,
            "mycellm": OBJECT,
        },
    ),
    "ModelList": list_of(ref("Model")),
    "Health": json_object(
        ["status", "workers"], {"status": {"enum": ["ok", "degraded"]}, "workers": INTEGER}
    ),
    "NodeStatus": json_object(
        ["peer_id", "account_id", "node_name", "version", "uptime_s", "models", "workers", "requests"],
        {
            "peer_id": STRING,
            "account_id": STRING,
            "node_name": STRING,
            "version": STRING,
            "uptime_s": NUMBER,
            "models": {"type": "array", "items": ref("Model")},
            "workers": {"type": "array", "items": OBJECT},
            "requests": OBJECT,
            "ray": OBJECT,
        },
    ),
    "ObjectList": list_of(OBJECT),
    "Credits": json_object(
        ["account_id", "balance", "transfers"],
        {"account_id": STRING, "balance": NUMBER, "transfers": {"type": "array", "items": OBJECT}},
    ),
    "ApiKey": API_KEY,
    "ApiKeyList": list_of(ref("ApiKey")),
    "ApiKeyCreated": API_KEY
    | {
        "required": [*API_KEY["required"], "key"],
        "properties": API_KEY["properties"]
        | {"key": STRING | {"description": "The key: shown once, never stored"}},
    },
}
