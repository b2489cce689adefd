"""Length bounds of wire fields: ids, names and texts, also inside the shared types messages carry."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from mycellm.types import EmbeddingRequest, GenerationRequest, ModelInfo, ToolCall

MAX_SIGNED_VALUE_BYTES = 65536


MAX_ID_CHARS = 128  # request and tool call ids


MAX_NAME_CHARS = 256  # model and tool names


MAX_TEXT_CHARS = 1 << 20  # answer text in one frame (the frame cap bounds it in bytes too)


MAX_TOOL_CALLS = 128


WireTime = Annotated[float, Field(allow_inf_nan=False)]


_NETWORK_ID = re.compile(r"[0-9a-f]{64}")


def _bound(text: str | None, what: str, limit: int) -> None:
    if text is not None and len(text) > limit:
        raise ValueError(f"{what} is over {limit} characters")


def _tool_calls(calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
    for call in calls:
        _bound(call.id, "tool call id", MAX_ID_CHARS)
        _bound(call.name, "tool name", MAX_NAME_CHARS)
    return calls


def _ids(request: GenerationRequest | EmbeddingRequest) -> None:
    _bound(request.request_id, "request_id", MAX_ID_CHARS)
    _bound(request.model, "model", MAX_NAME_CHARS)
    if request.network_id is not None and not _NETWORK_ID.fullmatch(request.network_id):
        raise ValueError("network_id is not 64 hex characters")


def check_generation(request: GenerationRequest) -> GenerationRequest:
    _ids(request)
    if len(request.stop) > 16 or any(len(item) > 1000 for item in request.stop):
        raise ValueError("stop holds over 16 strings or one over 1000 characters")
    return request


def check_embedding(request: EmbeddingRequest) -> EmbeddingRequest:
    _ids(request)
    return request


def _model(info: ModelInfo) -> ModelInfo:
    _bound(info.name, "model name", MAX_NAME_CHARS)
    _bound(info.backend, "backend", 64)
    _bound(info.tier, "tier", 64)
    if len(info.tags) > 32 or any(len(tag) > 64 for tag in info.tags):
        raise ValueError("tags hold over 32 tags or one over 64 characters")
    return info


WireToolCalls = Annotated[tuple[ToolCall, ...], Field(max_length=MAX_TOOL_CALLS), AfterValidator(_tool_calls)]


WireModel = Annotated[ModelInfo, AfterValidator(_model)]


WireBlob = Annotated[bytes, Field(max_length=MAX_SIGNED_VALUE_BYTES)]
