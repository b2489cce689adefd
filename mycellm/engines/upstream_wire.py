"""Bodies sent to and read from an OpenAI-compatible upstream: request payloads, JSON, error fields."""

from __future__ import annotations

import json
from typing import Any

from mycellm.engines.continuation import resume_refused
from mycellm.errors import UnsupportedParameterError, UpstreamError
from mycellm.types import GenerationRequest

ERROR_TEXT_MAX_CHARS = 500
# Chat fields that make vLLM, SGLang and TGI continue a final assistant message instead of
# starting a new one. Ollama and llama.cpp's server continue it anyway and ignore them; OpenAI
# rejects unknown fields, which turns a resume it would get wrong into a clear error.
CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}


def estimate_tokens(text: str) -> int:
    """A quarter token per character, at least one for any text: for upstreams that give no count."""
    return max(1, len(text) // 4) if text else 0


def generation_payload(
    request: GenerationRequest, upstream_model: str, continuation_tokens: int = 0
) -> tuple[str, dict[str, Any]]:
    """The path and body of a streamed generation.

    A resumed request (``continuation``) sends the continuation as the start of the answer: after
    the prompt of a legacy completion (without echo: the earlier attempt sent the prompt), or as
    a final assistant message of a chat, and asks for ``max_tokens`` less ``continuation_tokens``
    (the caller checks that some are left). Resuming a chat is best effort: a server that treats a
    final assistant message as a finished turn starts a new answer instead of continuing it.
    """
    if request.continuation and (
        (request.response_format or {}).get("type") not in (None, "text")
        or isinstance(request.tool_choice, dict)
        or request.tool_choice == "required"
    ):
        raise resume_refused("cannot resume a constrained generation")
    payload: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.max_tokens is not None:
        payload["max_tokens"] = request.max_tokens - continuation_tokens
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.stop:
        payload["stop"] = list(request.stop)
    # Zero penalties are the default; leaving them out keeps servers that reject them working.
    if request.presence_penalty:
        payload["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        payload["frequency_penalty"] = request.frequency_penalty
    if request.messages is not None:
        payload["messages"] = list(request.messages)
        if request.continuation:
            payload["messages"].append({"role": "assistant", "content": request.continuation})
            payload |= CONTINUE_FINAL_MESSAGE
        if request.tools is not None:
            payload["tools"] = list(request.tools)
        if request.tool_choice is not None:
            payload["tool_choice"] = request.tool_choice
        if request.response_format is not None:
            payload["response_format"] = request.response_format
        return "chat/completions", payload
    if request.response_format and request.response_format.get("type") not in (None, "text"):
        raise UnsupportedParameterError(
            "response_format is not supported for legacy completions on an upstream; use chat completions",
            param="response_format",
        )
    payload["prompt"] = (
        (request.prompt or "") + request.continuation if request.continuation else request.prompt
    )
    payload["echo"] = request.echo and not request.continuation
    return "completions", payload


def parse_json(text: str, base_url: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UpstreamError(f"upstream {base_url} sent malformed JSON: {text[:80]!r}") from error
    if not isinstance(value, dict):
        raise UpstreamError(f"upstream {base_url} sent JSON that is not an object")
    return value


def error_fields(body: Any) -> tuple[str, str | None, str | None]:
    """Message, param and code of an error body in the OpenAI shape or one of the common variants."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if not isinstance(error, dict):
        return str(error)[:ERROR_TEXT_MAX_CHARS], None, None
    message = str(error.get("message") or error.get("detail") or json.dumps(error))[:ERROR_TEXT_MAX_CHARS]
    param, code = error.get("param"), error.get("code")
    return message, param if isinstance(param, str) else None, code if isinstance(code, str) else None
