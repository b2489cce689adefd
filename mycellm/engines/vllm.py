"""vLLM engine: a Hugging Face model (id or local path) served on the local GPU by vLLM's async engine."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from mycellm.config import ModelSettings
from mycellm.engines.continuation import ContinuationStopMatcher, continuation_budget, resume_refused
from mycellm.engines.names import model_name_for
from mycellm.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    MycellmError,
    UnsupportedParameterError,
)
from mycellm.types import (
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Usage,
)

logger = logging.getLogger(__name__)

# Turns a JSON constraint ({"json_object": True} or {"json": schema}) into SamplingParams keywords.
StructuredOutput = Callable[[dict[str, Any]], dict[str, Any]]


class VllmEngine:
    backend = "vllm"

    def __init__(self, settings: ModelSettings) -> None:
        self._settings = settings
        self._name = model_name_for(settings)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._sampling_params: Any = None  # vllm.SamplingParams, known once vLLM is imported
        self._structured_output: StructuredOutput | None = None

    async def start(self) -> None:
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as error:
            if importlib.util.find_spec("vllm") is None:
                raise EngineError(
                    "the vllm backend needs vLLM, which is not installed: pip install 'mycellm[vllm]'"
                ) from error
            raise EngineError(f"vLLM is installed but cannot be imported: {error}") from error
        self._sampling_params = vllm.SamplingParams
        self._structured_output = _structured_output_for_installed_vllm()
        arguments = AsyncEngineArgs(
            model=self._settings.path,
            max_model_len=self._settings.context_tokens,
            gpu_memory_utilization=self._settings.gpu_memory_utilization,
            tensor_parallel_size=self._settings.tensor_parallel_size,
        )
        try:
            # Built on the event loop thread, as vLLM's own server does: the engine binds its output
            # task and sockets to the running loop. Loading blocks until the weights are on the GPU.
            self._engine = vllm.AsyncLLMEngine.from_engine_args(arguments)
            tokenizer = self._engine.get_tokenizer()  # a coroutine in older vLLM, a value in newer
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        except Exception as error:  # vLLM fails to load with many types (OSError, ValueError, RuntimeError)
            await self.close()
            raise EngineError(f"vLLM could not load {self._settings.path}: {error}") from error
        logger.info("vLLM loaded %s (context %d)", self._name, self.context_tokens)

    @property
    def context_tokens(self) -> int:
        # vLLM refuses to start when the model's window is shorter than max_model_len, so the
        # configured value is the window in use.
        return self._settings.context_tokens

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # The V1 engine (vLLM 0.8 and later) names it shutdown(); the V0 engine shutdown_background_loop().
        # Both return at once and must run on the loop that owns the engine's tasks.
        for method in ("shutdown", "shutdown_background_loop"):
            if callable(getattr(engine, method, None)):
                getattr(engine, method)()
                break

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=self._name,
                backend=self.backend,
                context_tokens=self.context_tokens,
                supports_embeddings=False,
                # Tools reach the chat template, but calls come back as text: no per-model parser.
                supports_tools=False,
                tier=self._settings.tier,
                tags=self._settings.tags,
            )
        ]

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._engine is None or self._tokenizer is None:
            raise EngineError(f"model {self._name} is not loaded")
        engine = self._engine
        prompt_tokens, tokens, param = await asyncio.to_thread(self._tokenize, request)
        self._check_prompt(request, prompt_tokens, param)
        continuation_tokens = max(0, len(tokens) - prompt_tokens)
        room = self.context_tokens - len(tokens)
        max_new = continuation_budget(request.max_tokens, continuation_tokens, room=room)
        # vLLM matches stop strings in its new text only; one that starts in the continuation is
        # matched here.
        matcher = (
            ContinuationStopMatcher(request.stop, request.continuation) if request.continuation else None
        )
        if max_new <= 0 or (matcher is not None and matcher.stopped):
            # A continuation that used the whole budget (or the context), or ends in a stop string.
            ended: FinishReason = "stop" if matcher is not None and matcher.stopped else "length"
            done = continuation_tokens
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=done, continuation_tokens=done)
            yield GenerationChunk(finish_reason=ended, usage=usage)
            return
        sampling = self._sampling(request, max_tokens=max_new)
        # A caller may reuse a request id (a retry); vLLM needs it unique among running requests.
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        outputs = engine.generate({"prompt_token_ids": tokens}, sampling, request_id)
        finished = False
        sent = ""
        try:
            if request.echo and request.prompt is not None and not request.continuation:
                yield GenerationChunk(text=request.prompt)
            async for output in outputs:
                completion = output.outputs[0]
                delta, sent = _new_text(completion.text, sent, matcher, output.finished)
                if delta:
                    yield GenerationChunk(text=delta)
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=continuation_tokens + len(completion.token_ids),
                    continuation_tokens=continuation_tokens,
                )
                if matcher is not None and matcher.stopped:
                    # vLLM would go on: free its slot now, not when this generator is closed.
                    finished = True
                    await self._abort(outputs, request_id)
                    yield GenerationChunk(finish_reason="stop", usage=usage)
                    return
                if output.finished:
                    finished = True
                    yield self._finish_chunk(completion.finish_reason, usage)
                    return
            raise EngineError(f"vLLM ended the generation of {self._name} without finishing it")
        except MycellmError:
            raise
        except Exception as error:  # vLLM's types differ by version; translate them here, at the edge
            raise _translated(error) from error
        finally:
            if not finished:
                await self._abort(outputs, request_id)

    def _check_prompt(self, request: GenerationRequest, prompt_tokens: int, param: str) -> None:
        """Refuse a prompt that fills the context, and the resume of a constrained generation."""
        limit = self.context_tokens
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens, "
                f"but the {param} has {prompt_tokens} tokens.",
                param=param,
            )
        if request.continuation and json_constraint(request.response_format) is not None:
            raise resume_refused("cannot resume a constrained generation")

    def _finish_chunk(self, vllm_reason: str | None, usage: Usage) -> GenerationChunk:
        """The last chunk of a generation vLLM finished; one it aborted is an error."""
        if vllm_reason == "abort":
            raise EngineError(f"vLLM aborted the generation of {self._name}")
        finish: FinishReason = "length" if vllm_reason == "length" else "stop"
        return GenerationChunk(finish_reason=finish, usage=usage)

    async def _abort(self, outputs: Any, request_id: str) -> None:
        """Free the request's GPU slot when the caller stopped reading before the end."""
        try:
            # Closing vLLM's stream aborts in the V1 engine; the V0 engine needs the explicit call,
            # which is harmless for a request that is already gone.
            await outputs.aclose()
            if self._engine is not None:
                await self._engine.abort(request_id)
        except Exception as error:  # cleanup must not hide the reason the stream ended
            logger.warning("could not abort vLLM request %s: %s", request_id, error)

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """The prompt's tokens as this model renders it, and ``text``'s as its tokenizer reads it."""
        if self._tokenizer is None:
            return None
        try:
            prompt, _tokens, _param = self._tokenize(request.model_copy(update={"continuation": None}))
        except MycellmError:
            return None
        answer = self._tokenizer.encode(text, add_special_tokens=False) if text else []
        return Usage(prompt_tokens=prompt, completion_tokens=len(answer))

    def _tokenize(self, request: GenerationRequest) -> tuple[int, list[int], str]:
        """The prompt's token count, the tokens to generate after (the prompt, then the
        continuation of a resumed request) and the request field that holds the prompt."""
        text, param = self._prompt_text(request)
        # A completion prompt gets the tokenizer's special tokens (BOS); a rendered chat template
        # already holds them.
        special = request.messages is None
        prompt = list(self._tokenizer.encode(text, add_special_tokens=special))
        if not request.continuation:
            return len(prompt), prompt, param
        # Tokenized together, as one generation would have had them.
        tokens = list(self._tokenizer.encode(text + request.continuation, add_special_tokens=special))
        return len(prompt), tokens, param

    def _prompt_text(self, request: GenerationRequest) -> tuple[str, str]:
        tokenizer = self._tokenizer
        if request.messages is None:
            return request.prompt or "", "prompt"
        if isinstance(request.tool_choice, dict) or request.tool_choice == "required":
            raise UnsupportedParameterError(
                "the vLLM engine cannot force a tool call; use tool_choice 'auto'", param="tool_choice"
            )
        options = {"tools": list(request.tools)} if request.tools and request.tool_choice != "none" else {}
        try:
            text = tokenizer.apply_chat_template(
                list(request.messages), tokenize=False, add_generation_prompt=True, **options
            )
        except Exception as error:  # the template is model-supplied Jinja; any failure is the input's
            raise InvalidRequestError(
                f"messages cannot be rendered by the chat template of {self._name}: {error}", param="messages"
            ) from error
        return str(text), "messages"

    def _sampling(self, request: GenerationRequest, max_tokens: int) -> Any:
        options: dict[str, Any] = {
            # Always set: vLLM's default is 16 tokens; OpenAI's is "until the context is full".
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": list(request.stop) or None,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        constraint = json_constraint(request.response_format)
        if constraint is not None:
            if self._structured_output is None:
                raise UnsupportedParameterError(
                    "response_format needs structured output, which this vLLM lacks (0.6.3 or later has it)",
                    param="response_format",
                )
            options |= self._structured_output(constraint)
        try:
            return self._sampling_params(**options)
        except ValueError as error:
            raise InvalidRequestError(f"vLLM rejected the sampling parameters: {error}") from error

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise UnsupportedParameterError(
            f"model {self._name} is served by vLLM for generation only; this node does not serve "
            "embeddings with vLLM (use a llama.cpp or OpenAI-upstream model for embeddings)",
            param="model",
        )


def json_constraint(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The structured-output constraint a response_format asks for, or None for free text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be an object", param="response_format"
            )
        return {"json": schema}
    raise InvalidRequestError(f"unknown response_format type {kind!r}", param="response_format.type")


def _new_text(
    text: str, sent: str, matcher: ContinuationStopMatcher | None, finished: bool
) -> tuple[str, str]:
    """What a cumulative output's text adds to the text sent so far, through a resumed request's
    stop matcher; and the text sent so far after it."""
    # vLLM's outputs are cumulative; stop strings are held back until they cannot match, so the
    # text only grows.
    delta = ""
    if len(text) > len(sent) and text.startswith(sent):
        delta, sent = text[len(sent) :], text
    if matcher is not None:
        delta = matcher.feed(delta)
        if finished or matcher.stopped:
            delta += matcher.flush()
    return delta, sent


def _translated(error: Exception) -> MycellmError:
    """A vLLM error as the project's: the request's fault, or the engine's."""
    if _is_client_error(error):
        return InvalidRequestError(f"vLLM rejected the request: {error}")
    return EngineError(f"vLLM generation failed: {error}")


def _is_client_error(error: Exception) -> bool:
    """Whether vLLM blames the request: ValueError up to 0.11, VLLMClientError in later versions."""
    return isinstance(error, ValueError) or any(
        cls.__name__ == "VLLMClientError" for cls in type(error).__mro__
    )


def _structured_output_for_installed_vllm() -> StructuredOutput | None:
    """How this vLLM takes a JSON constraint: structured_outputs (0.10.2+), guided_decoding
    (0.6.3 to 0.11; removed in 0.12), or not at all (older)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        pass
    else:
        return lambda constraint: {"structured_outputs": StructuredOutputsParams(**constraint)}
    try:
        from vllm.sampling_params import GuidedDecodingParams
    except ImportError:
        return None
    return lambda constraint: {"guided_decoding": GuidedDecodingParams(**constraint)}
