"""OpenAI response objects: completions, chunks, embeddings, usage and errors as JSON."""

from __future__ import annotations

import base64
import logging
import struct
import time
from typing import Any

from mycellm.types import (
    CompletionResult,
    EmbeddingResult,
    GenerationChunk,
    ToolCall,
    Usage,
)

logger = logging.getLogger(__name__)


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _tool_calls_json(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for index, call in enumerate(calls)
    ]


def chat_completion_json(
    request_id: str, model: str, result: CompletionResult, extra: dict[str, Any]
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text if not result.tool_calls else None}
    if result.tool_calls:
        message["tool_calls"] = [
            {key: value for key, value in call.items() if key != "index"}
            for call in _tool_calls_json(result.tool_calls)
        ]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        ],
        "usage": usage_json(result.usage),
        **extra,
    }


def chat_chunk_json(
    request_id: str, model: str, created: int, chunk: GenerationChunk | None, *, role: bool = False
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``chunk`` None with ``role`` opens the stream."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if chunk is not None:
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls:
            delta["tool_calls"] = _tool_calls_json(chunk.tool_calls)
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": chunk.finish_reason if chunk else None,
                "logprobs": None,
            }
        ],
    }


def completion_json(
    request_id: str, model: str, result: CompletionResult, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        ],
        "usage": usage_json(result.usage),
        **extra,
    }


def completion_chunk_json(
    request_id: str, model: str, created: int, chunk: GenerationChunk
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}],
    }


def usage_chunk_json(
    request_id: str, model: str, created: int, usage: Usage, object_name: str
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage),
    }


def embeddings_json(model: str, result: EmbeddingResult, encoding_format: str) -> dict[str, Any]:
    def encode(vector: tuple[float, ...]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return list(vector)

    return {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": index, "embedding": encode(vector)}
            for index, vector in enumerate(result.vectors)
        ],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def error_json(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
