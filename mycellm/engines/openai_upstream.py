"""OpenAI-compatible upstream engine: proxies generations and embeddings to a /v1 server (Ollama, vLLM)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from mycellm.config import ModelSettings
from mycellm.engines.base import (
    ContinuationStopMatcher,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    ToolCall,
    Usage,
    resume_refused,
)
from mycellm.engines.upstream_wire import (
    ERROR_TEXT_MAX_CHARS,
    error_fields,
    estimate_tokens,
    generation_payload,
    parse_json,
)
from mycellm.errors import (
    ConfigError,
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    MycellmError,
    UpstreamError,
)

logger = logging.getLogger(__name__)

# A dead upstream should fail over fast, whatever the (long) read timeout for slow generations is.
CONNECT_TIMEOUT_S = 10.0
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
# Keys under which servers report a model's context window in /models (vLLM, OpenRouter, Groq).
CONTEXT_KEYS = ("max_model_len", "context_length", "context_window")
SSE_FIELDS = ("event:", "id:", "retry:")


@dataclass
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _StreamState:
    """What a stream has said so far, beyond the text already yielded."""

    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    characters: int = 0  # generated text and tool arguments, for estimating usage
    deltas: int = 0
    continuation_tokens: int = 0  # the estimated tokens of a resumed request's continuation
    tool_calls: dict[int, _ToolCallParts] = field(default_factory=dict)


class OpenAIUpstreamEngine:
    backend = "openai"

    def __init__(self, settings: ModelSettings) -> None:
        if not settings.base_url:
            raise ConfigError("the openai backend needs base_url", param="base_url")
        self._settings = settings
        self._base_url = settings.base_url.rstrip("/")
        self._api_key: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._served: dict[str, str] = {}  # the name we expose -> the upstream's model id
        self._context_tokens: dict[str, int] = {}  # upstream id -> context window, where it says
        self._warned_estimate = False

    async def start(self) -> None:
        self._api_key = self._settings.resolved_api_key()
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout_s = self._settings.timeout_s
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        )
        try:
            listing = await self._request_json("GET", "models", None, None)
            self._choose_models(listing)
        except BaseException:
            await self.close()
            raise
        served = ", ".join(f"{name} ({upstream})" for name, upstream in self._served.items())
        logger.info("upstream %s: serving %s", self._base_url, served)

    def _choose_models(self, listing: dict[str, Any]) -> None:
        entries: Any = listing.get("data")
        try:
            available = [entry["id"] for entry in entries]
        except (KeyError, TypeError) as error:
            raise UpstreamError(f"upstream {self._base_url} sent a malformed model list") from error
        for entry in entries:
            known = [entry[key] for key in CONTEXT_KEYS if isinstance(entry.get(key), int) and entry[key] > 0]
            if known:
                self._context_tokens[entry["id"]] = known[0]
        wanted = list(self._settings.upstream_models) or available
        missing = [model for model in wanted if model not in available]
        if missing:
            offered = ", ".join(available) or "nothing"
            raise EngineError(
                f"upstream {self._base_url} does not serve {', '.join(missing)}; it serves: {offered}"
            )
        if not wanted:
            raise EngineError(f"upstream {self._base_url} serves no models")
        if self._settings.name and len(wanted) == 1:
            self._served = {self._settings.name: wanted[0]}
        else:
            if self._settings.name:
                logger.warning("name %r ignored: upstream serves %d models", self._settings.name, len(wanted))
            self._served = {model: model for model in wanted}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=name,
                backend=self.backend,
                context_tokens=self._context_tokens.get(upstream, self._settings.context_tokens),
                supports_embeddings=True,
                supports_tools=True,
                tier=self._settings.tier,
                tags=self._settings.tags,
            )
            for name, upstream in self._served.items()
        ]

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one generation; a resumed one as GenerationRequest and generation_payload say."""
        client = self._require_client()
        # The upstream has no tokenizer to offer: the continuation's tokens are estimated.
        continuation_tokens = estimate_tokens(request.continuation)
        path, payload = generation_payload(request, self._upstream_model(request.model), continuation_tokens)
        state = _StreamState(continuation_tokens=continuation_tokens)
        # The upstream matches stop strings in its new text only; one that starts in the
        # continuation is matched here.
        matcher = (
            ContinuationStopMatcher(request.stop, request.continuation) if request.continuation else None
        )
        if matcher is not None and matcher.stopped:
            state.finish_reason = "stop"
        elif request.max_tokens is not None and continuation_tokens >= request.max_tokens:
            state.finish_reason = "length"
        if state.finish_reason is not None:  # a continuation that already ends the answer
            yield self._final_chunk(state, request)
            return
        try:
            response = await client.send(client.build_request("POST", path, json=payload), stream=True)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        # The finally closes the HTTP response on every exit, an early aclose() of this generator
        # included, so the upstream sees the disconnect and stops generating.
        try:
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._generation_status_error(response.status_code, response.text, request)
                if response.headers.get("content-type", "").startswith("application/json"):
                    # A server that ignored stream=true: take the whole answer as one event.
                    await response.aread()
                    text = self._absorb(state, parse_json(response.text, self._base_url), request)
                    text = _matched(matcher, state, text)
                    if text:
                        yield GenerationChunk(text=text)
                    state.finish_reason = state.finish_reason or "stop"
                else:
                    async for line in response.aiter_lines():
                        event = self._parse_sse_line(line)
                        if event is None:
                            continue
                        if isinstance(event, str):  # "[DONE]"
                            state.finish_reason = state.finish_reason or "stop"
                            break
                        text = _matched(matcher, state, self._absorb(state, event, request))
                        if text:
                            yield GenerationChunk(text=text)
                        if matcher is not None and matcher.stopped:
                            break  # closing the response stops the upstream; usage is estimated
            except httpx.HTTPError as error:
                raise self._transport_error(error) from error
            if matcher is not None and (text := matcher.flush()):
                yield GenerationChunk(text=text)
            # Closed before the last chunk, after which a caller may leave this generator open: an
            # upstream cut short by a stop found here must stop generating now.
            await response.aclose()
            yield self._final_chunk(state, request)
        finally:
            await response.aclose()

    def _generation_status_error(self, status: int, body: str, request: GenerationRequest) -> MycellmError:
        error = self._status_error(status, body, request.model)
        if request.continuation and isinstance(error, InvalidRequestError):
            # The client's request was accepted before; what this upstream refuses is the resume
            # (OpenAI itself rejects the fields that ask to continue the final assistant message).
            return resume_refused(f"upstream cannot resume a {request.kind} generation: {error.message}")
        return error

    def _parse_sse_line(self, line: str) -> dict[str, Any] | str | None:
        """One SSE line: None for lines without data, ``"[DONE]"``, or the decoded event."""
        line = line.strip()
        if not line or line.startswith(":") or line.startswith(SSE_FIELDS):
            return None
        if not line.startswith("data:"):
            raise UpstreamError(f"upstream {self._base_url} sent a malformed event stream: {line[:80]!r}")
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return data
        return parse_json(data, self._base_url)

    def _absorb(self, state: _StreamState, event: dict[str, Any], request: GenerationRequest) -> str:
        """Fold one event (a stream chunk or a whole response) into the state; return its new text."""
        if event.get("error"):
            message, _, _ = error_fields(event)
            raise UpstreamError(f"upstream {self._base_url} failed mid-generation: {self._redact(message)}")
        if isinstance(event.get("usage"), dict):
            state.usage = event["usage"]
        choices = event.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise UpstreamError(f"upstream {self._base_url} sent malformed choices")
        texts: list[str] = []
        for choice in choices:
            if choice.get("index") not in (0, None):
                continue  # we always ask for one choice
            if choice.get("finish_reason"):
                state.finish_reason = str(choice["finish_reason"])
            if request.kind == "completion":
                text = choice.get("text")
                calls: list[Any] = []
            else:
                delta = choice.get("delta") or choice.get("message") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                calls = (delta.get("tool_calls") if isinstance(delta, dict) else None) or []
            if isinstance(text, str) and text:
                texts.append(text)
                state.deltas += 1
                state.characters += len(text)
            for position, call in enumerate(calls):
                self._absorb_tool_call(state, position, call)
        return "".join(texts)

    def _absorb_tool_call(self, state: _StreamState, position: int, call: Any) -> None:
        # Streamed deltas carry an index; a whole (non-streamed) message lists calls in order.
        index = call.get("index", position) if isinstance(call, dict) else None
        function = (call.get("function") or {}) if isinstance(call, dict) else None
        if not isinstance(index, int) or not isinstance(function, dict):
            raise UpstreamError(f"upstream {self._base_url} sent a malformed tool call")
        parts = state.tool_calls.setdefault(index, _ToolCallParts())
        if call.get("id"):
            parts.id = str(call["id"])
        if function.get("name") and not parts.name:
            parts.name = str(function["name"])
        if function.get("arguments"):
            arguments = function["arguments"]
            parts.arguments.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
            state.deltas += 1
            state.characters += len(parts.arguments[-1])

    def _final_chunk(self, state: _StreamState, request: GenerationRequest) -> GenerationChunk:
        if state.finish_reason is None:
            raise UpstreamError(f"upstream {self._base_url} ended the stream before the generation finished")
        calls: list[ToolCall] = []
        for _, parts in sorted(state.tool_calls.items()):
            if not parts.name:
                raise UpstreamError(f"upstream {self._base_url} sent a tool call without a function name")
            call_id = parts.id or f"call_{uuid.uuid4().hex[:24]}"
            calls.append(ToolCall(id=call_id, name=parts.name, arguments="".join(parts.arguments)))
        return GenerationChunk(
            tool_calls=tuple(calls),
            finish_reason=FINISH_REASONS.get(state.finish_reason, "stop"),
            usage=self._usage(state, request),
        )

    def _usage(self, state: _StreamState, request: GenerationRequest) -> Usage:
        """The upstream's usage; where it sends none (or a zero prompt count), an estimate.

        The estimate is a quarter token per character of the prompt (the messages as JSON, whose
        overhead stands in for the chat template) and of the output, and at least one token per
        streamed delta. It is logged, because the ledger bills it.

        A resumed request adds the continuation's estimated tokens to the completion. The prompt
        count stays the upstream's, which includes the continuation (it was sent as prompt): the
        continuation is counted twice, which is kept over subtracting an estimate from the
        upstream's exact count, since that could undercount the prompt.
        """
        reported = state.usage or {}
        prompt, completion = reported.get("prompt_tokens"), reported.get("completion_tokens")
        if request.messages is not None:
            prompt_text = json.dumps([*request.messages, *(request.tools or ())], default=str)
        else:
            prompt_text = request.prompt or ""
        if isinstance(prompt, int) and prompt >= 0 and (prompt > 0 or not prompt_text):
            prompt_tokens = prompt
        else:
            prompt_tokens = estimate_tokens(prompt_text)
            self._warn_estimate("prompt")
        if isinstance(completion, int) and completion >= 0:
            completion_tokens = completion
        else:
            completion_tokens = max(state.deltas, state.characters // 4)
            self._warn_estimate("completion")
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens + state.continuation_tokens
        )

    def _warn_estimate(self, what: str) -> None:
        # Once at WARNING so the operator knows billing is estimated; then DEBUG to spare the log.
        level = logging.DEBUG if self._warned_estimate else logging.WARNING
        logger.log(level, "upstream %s reported no %s token count; using an estimate", self._base_url, what)
        self._warned_estimate = True

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        inputs = [item if isinstance(item, str) else list(item) for item in request.inputs]
        payload = {"model": self._upstream_model(request.model), "input": inputs, "encoding_format": "float"}
        body = await self._request_json("POST", "embeddings", payload, request.model)
        data = body.get("data")
        if not isinstance(data, list) or len(data) != len(inputs):
            raise UpstreamError(f"upstream {self._base_url} did not return one embedding per input")
        try:
            ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
            vectors = tuple(tuple(float(value) for value in item["embedding"]) for item in ordered)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise UpstreamError(f"upstream {self._base_url} sent malformed embeddings") from error
        prompt_tokens = (body.get("usage") or {}).get("prompt_tokens")
        if not isinstance(prompt_tokens, int) or prompt_tokens < 0:
            self._warn_estimate("embedding")
            prompt_tokens = sum(len(item) // 4 + 1 if isinstance(item, str) else len(item) for item in inputs)
        return EmbeddingResult(vectors=vectors, prompt_tokens=prompt_tokens)

    # -- HTTP plumbing ----------------------------------------------------------------------

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineError(f"upstream engine for {self._base_url} is not started")
        return self._client

    def _upstream_model(self, name: str) -> str:
        upstream = self._served.get(name)
        if upstream is None:
            raise ModelNotFoundError(f"model {name!r} is not served by {self._base_url}", param="model")
        return upstream

    async def _request_json(
        self, method: str, path: str, payload: dict[str, Any] | None, model: str | None
    ) -> dict[str, Any]:
        client = self._require_client()
        try:
            response = await client.request(method, path, json=payload)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.text, model)
        return parse_json(response.text, self._base_url)

    def _transport_error(self, error: httpx.HTTPError) -> UpstreamError:
        if isinstance(error, httpx.TimeoutException):
            limit = f"{type(error).__name__}, limit {self._settings.timeout_s} s"
            return UpstreamError(f"upstream {self._base_url} timed out ({limit})")
        detail = self._redact(str(error)) or type(error).__name__
        if isinstance(error, httpx.ConnectError):
            return UpstreamError(f"cannot reach upstream {self._base_url}: {detail}")
        return UpstreamError(f"upstream {self._base_url} failed: {detail}")

    def _status_error(self, status: int, body: str, model: str | None) -> MycellmError:
        try:
            message, param, code = error_fields(json.loads(body))
        except (ValueError, AttributeError):
            message, param, code = body.strip()[:ERROR_TEXT_MAX_CHARS], None, None
        message = self._redact(message)
        where = f"upstream {self._base_url}"
        if status in (400, 422):
            error_class = ContextLengthError if code == "context_length_exceeded" else InvalidRequestError
            return error_class(message or f"{where} rejected the request (HTTP {status})", param=param)
        if status == 404:
            return ModelNotFoundError(f"{where} does not serve model {model!r}: {message}", param="model")
        if status in (401, 403):
            return UpstreamError(f"{where} rejected the credentials (HTTP {status})")
        if status == 429:
            return UpstreamError(f"{where} is rate limiting (HTTP 429): {message}")
        return UpstreamError(f"{where} failed with HTTP {status}: {message}")

    def _redact(self, text: str) -> str:
        # Upstreams sometimes echo the key they rejected; it must never reach a log or a client.
        return text.replace(self._api_key, "[redacted]") if self._api_key else text


def _matched(matcher: ContinuationStopMatcher | None, state: _StreamState, text: str) -> str:
    """New text through the stop matcher of a resumed request; a stop it finds ends the generation."""
    if matcher is None:
        return text
    text = matcher.feed(text)
    if matcher.stopped:
        state.finish_reason = "stop"
    return text
