"""OpenAI-compatible upstream engine: proxies generations and embeddings to a /v1 server (Ollama, vLLM)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from mycellm.config import ModelSettings
from mycellm.engines.continuation import ContinuationStopMatcher, resume_refused
from mycellm.engines.upstream_stream import StreamState, parse_sse_line
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
from mycellm.types import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Usage,
)

logger = logging.getLogger(__name__)

# A dead upstream should fail over fast, whatever the (long) read timeout for slow generations is.
CONNECT_TIMEOUT_S = 10.0
# Keys under which servers report a model's context window in /models (vLLM, OpenRouter, Groq).
CONTEXT_KEYS = ("max_model_len", "context_length", "context_window")


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
        state = StreamState(self._base_url, self._redact, continuation_tokens=continuation_tokens)
        # The upstream matches stop strings in its new text only; one that starts in the
        # continuation is matched here.
        matcher = (
            ContinuationStopMatcher(request.stop, request.continuation) if request.continuation else None
        )
        state.finish_reason = _continuation_finish(request, matcher, continuation_tokens)
        if state.finish_reason is not None:  # a continuation that already ends the answer
            yield state.final_chunk(request, self._warn_estimate)
            return
        try:
            response = await client.send(client.build_request("POST", path, json=payload), stream=True)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from error
        # The finally closes the HTTP response on every exit, an early aclose() of this generator
        # included, so the upstream sees the disconnect and stops generating.
        try:
            try:
                async with aclosing(self._response_texts(response, state, matcher, request)) as texts:
                    async for text in texts:
                        yield GenerationChunk(text=text)
            except httpx.HTTPError as error:
                raise self._transport_error(error) from error
            if matcher is not None and (text := matcher.flush()):
                yield GenerationChunk(text=text)
            # Closed before the last chunk, after which a caller may leave this generator open: an
            # upstream cut short by a stop found here must stop generating now.
            await response.aclose()
            yield state.final_chunk(request, self._warn_estimate)
        finally:
            await response.aclose()

    async def _response_texts(
        self,
        response: httpx.Response,
        state: StreamState,
        matcher: ContinuationStopMatcher | None,
        request: GenerationRequest,
    ) -> AsyncGenerator[str, None]:
        """The new texts of a generation's response, folded into the state; empty ones left out."""
        if response.status_code >= 400:
            await response.aread()
            raise self._generation_status_error(response.status_code, response.text, request)
        if response.headers.get("content-type", "").startswith("application/json"):
            # A server that ignored stream=true: take the whole answer as one event.
            await response.aread()
            text = _matched(matcher, state, state.absorb(parse_json(response.text, self._base_url), request))
            if text:
                yield text
            state.finish_reason = state.finish_reason or "stop"
            return
        async for line in response.aiter_lines():
            event = parse_sse_line(line, self._base_url)
            if event is None:
                continue
            if isinstance(event, str):  # "[DONE]"
                state.finish_reason = state.finish_reason or "stop"
                break
            text = _matched(matcher, state, state.absorb(event, request))
            if text:
                yield text
            if matcher is not None and matcher.stopped:
                break  # closing the response stops the upstream; usage is estimated

    def _generation_status_error(self, status: int, body: str, request: GenerationRequest) -> MycellmError:
        error = self._status_error(status, body, request.model)
        if request.continuation and isinstance(error, InvalidRequestError):
            # The client's request was accepted before; what this upstream refuses is the resume
            # (OpenAI itself rejects the fields that ask to continue the final assistant message).
            return resume_refused(f"upstream cannot resume a {request.kind} generation: {error.message}")
        return error

    def _warn_estimate(self, what: str) -> None:
        # Once at WARNING so the operator knows billing is estimated; then DEBUG to spare the log.
        level = logging.DEBUG if self._warned_estimate else logging.WARNING
        logger.log(level, "upstream %s reported no %s token count; using an estimate", self._base_url, what)
        self._warned_estimate = True

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """None: an upstream lends no tokenizer, so a seeder's usage is checked by its bounds."""
        return None

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


def _continuation_finish(
    request: GenerationRequest, matcher: ContinuationStopMatcher | None, continuation_tokens: int
) -> str | None:
    """Why a resumed request's continuation already ends the answer (a stop, the length), if it does."""
    if matcher is not None and matcher.stopped:
        return "stop"
    if request.max_tokens is not None and continuation_tokens >= request.max_tokens:
        return "length"
    return None


def _matched(matcher: ContinuationStopMatcher | None, state: StreamState, text: str) -> str:
    """New text through the stop matcher of a resumed request; a stop it finds ends the generation."""
    if matcher is None:
        return text
    text = matcher.feed(text)
    if matcher.stopped:
        state.finish_reason = "stop"
    return text
