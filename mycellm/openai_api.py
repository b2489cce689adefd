"""OpenAI request/response shapes: lenient at the edge (unknown fields logged), strict inside."""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mycellm.engines.base import (
    CompletionResult,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ToolCall,
    Usage,
)
from mycellm.errors import InvalidRequestError, UnsupportedParameterError
from mycellm.routing import RoutingOptions

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
BodyT = TypeVar("BodyT", bound=BaseModel)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as a chat template expects it: text content only."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = _flatten_content(self.content)
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _flatten_content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedParameterError(
                f"content part of type {part.get('type')!r} is not supported; only text parts are",
                param=f"messages.content.{index}",
            )
        texts.append(part["text"])
    return "".join(texts)


class _SamplingBody(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    user: str | None = None
    mycellm: RoutingOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def check_supported(self) -> None:
        if self.n is not None and self.n > 1:
            raise InvalidRequestError("n > 1 is not supported; send separate requests", param="n")
        if self.logprobs:
            raise UnsupportedParameterError("logprobs are not supported by this node", param="logprobs")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> dict[str, Any]:
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": self.stops(),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
        }


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def to_request(self, request_id: str, model: str) -> GenerationRequest:
        self.check_supported()
        return GenerationRequest(
            request_id=request_id,
            model=model,
            messages=tuple(message.plain() for message in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            response_format=self.response_format.model_dump(exclude_none=True)
            if self.response_format
            else None,
            tools=tuple(tool.model_dump(exclude_none=True) for tool in self.tools) if self.tools else None,
            tool_choice=self.tool_choice,
            **self.sampling(),
        )


class CompletionBody(_SamplingBody):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def to_request(self, request_id: str, model: str) -> GenerationRequest:
        self.check_supported()
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequestError("only one prompt per request is supported", param="prompt")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        if self.suffix:
            raise UnsupportedParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of is not None and self.best_of > 1:
            raise InvalidRequestError("best_of > 1 is not supported", param="best_of")
        return GenerationRequest(
            request_id=request_id,
            model=model,
            prompt=prompt,
            max_tokens=self.max_tokens or 16,  # the legacy API's default
            echo=self.echo,
            **self.sampling(),
        )


class EmbeddingBody(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    mycellm: RoutingOptions | None = None

    def inputs(self) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
        if self.dimensions is not None:
            raise UnsupportedParameterError("dimensions is not supported", param="dimensions")
        value = self.input
        if isinstance(value, str):
            items: tuple[Any, ...] = (value,)
        elif value and all(isinstance(item, int) for item in value):
            items = (tuple(value),)  # one input given as token ids
        elif value and all(isinstance(item, list) for item in value):
            items = tuple(tuple(item) for item in value)  # type: ignore[arg-type]
        else:
            items = tuple(value)
        if not items or any(len(item) == 0 for item in items):
            raise InvalidRequestError("input must not be empty", param="input")
        if len(items) > 2048:
            raise InvalidRequestError("at most 2048 inputs per request", param="input")
        return items


def parse_body(raw: bytes, body_type: type[BodyT]) -> BodyT:
    """Decode and validate a JSON body; InvalidRequestError names the first bad field."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequestError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        body = body_type.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        raise InvalidRequestError(f"{field}: {first['msg']}", param=field or None) from error
    if body.model_extra:
        logger.info("ignoring unknown fields %s", sorted(body.model_extra))
    return body


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location (``prompt.list[str]``); drop it."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-"))


# -- responses ----------------------------------------------------------------------------------


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
