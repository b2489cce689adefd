"""llama.cpp engine: any GGUF file (the bundled SmolLM2 by default), chat template from the GGUF."""

from __future__ import annotations

import asyncio
import codecs
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from mycellm.config import ModelSettings
from mycellm.engines.continuation import ContinuationStopMatcher, continuation_budget, resume_refused
from mycellm.engines.grammar import compile_grammar, end_tool_call, response_format_grammar, tool_grammar_for
from mycellm.engines.model_files import resolve_model_path
from mycellm.engines.names import model_name_for, model_tier_for
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


@dataclass(frozen=True)
class _Prepared:
    """A request turned into tokens and sampling choices, checked against the context window."""

    request: GenerationRequest
    tokens: list[int]  # the prompt, then the continuation of a resumed generation
    prompt_tokens: int  # the prompt alone
    continuation_tokens: int
    max_new_tokens: int  # zero or less when the continuation already used the budget
    stops: tuple[str, ...]
    grammar_text: str | None
    grammar_is_schema: bool
    forced_tool: str | None  # the function whose arguments the grammar produces


class LlamaCppEngine:
    backend = "llama_cpp"

    def __init__(self, settings: ModelSettings) -> None:
        self._settings = settings
        self._name = model_name_for(settings)
        self._llama: llama_cpp.Llama | None = None
        self._embedder: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        # llama.cpp contexts are not thread-safe: one thread generates, another embeds.
        self._generate_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-generate")
        self._embed_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-embed")
        self._embed_lock = asyncio.Lock()
        self._closing = threading.Event()
        self._path: Path | None = None

    @property
    def threads(self) -> int:
        import os

        return self._settings.threads or os.cpu_count() or 1

    async def start(self) -> None:
        self._path = resolve_model_path(self._settings.path)
        loop = asyncio.get_running_loop()
        self._llama = await loop.run_in_executor(self._generate_thread, self._load, False)
        template = self._settings.chat_template or self._llama.metadata.get("tokenizer.chat_template")
        if template:
            model = self._llama._model
            eos, bos = self._llama.token_eos(), self._llama.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
        logger.info(
            "loaded %s from %s (context %d, %d threads)",
            self._name,
            self._path,
            self.context_tokens,
            self.threads,
        )

    def _load(self, embedding: bool) -> llama_cpp.Llama:
        assert self._path is not None
        options: dict[str, Any] = {
            "model_path": str(self._path),
            "n_ctx": self._settings.context_tokens,
            "n_threads": self.threads,
            "n_threads_batch": self.threads,
            "n_gpu_layers": self._settings.gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0,
            "verbose": False,
        }
        if embedding:
            # Mean pooling needs the whole input in one micro-batch.
            options |= {
                "embedding": True,
                "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                "n_batch": self._settings.context_tokens,
                "n_ubatch": self._settings.context_tokens,
            }
        else:
            options["n_batch"] = self._settings.batch_tokens
        try:
            return llama_cpp.Llama(**options)
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"llama.cpp could not load {self._path}: {error}") from error

    @property
    def context_tokens(self) -> int:
        return self._llama.n_ctx() if self._llama is not None else self._settings.context_tokens

    async def close(self) -> None:
        # A generation still running stops at its next token; the contexts are freed only once no
        # thread uses them (freeing one mid-decode crashes the process).
        self._closing.set()
        for thread in (self._generate_thread, self._embed_thread):
            await asyncio.to_thread(thread.shutdown, wait=True, cancel_futures=True)
        for llama in (self._llama, self._embedder):
            if llama is not None:
                llama.close()
        self._llama = self._embedder = None

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=self._name,
                backend=self.backend,
                context_tokens=self.context_tokens,
                supports_embeddings=self._settings.embeddings,
                supports_tools=True,
                tier=model_tier_for(self._settings),
                tags=self._settings.tags,
            )
        ]

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        llama = self._require_loaded()
        prepared = await asyncio.to_thread(self._prepare, llama, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | MycellmError] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: GenerationChunk | MycellmError) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        loop.run_in_executor(self._generate_thread, self._run, llama, prepared, emit, cancelled)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, MycellmError):
                    raise item
                yield item
                if item.is_final:
                    return
        finally:
            cancelled.set()

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """The tokens of ``request``'s prompt as this engine renders it, and of ``text`` (what an
        answer to it printed, the continuation included) as this model's tokenizer reads it."""
        llama = self._llama
        if llama is None:
            return None
        plain = request.model_copy(update={"continuation": None, "max_tokens": None})
        try:
            prompt = (await asyncio.to_thread(self._prepare, llama, plain)).prompt_tokens
        except MycellmError:
            return None
        answer = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []
        return Usage(prompt_tokens=prompt, completion_tokens=len(answer))

    def _require_loaded(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise EngineError(f"model {self._name} is not loaded")
        return self._llama

    def _prepare(self, llama: llama_cpp.Llama, request: GenerationRequest) -> _Prepared:
        stops = list(request.stop)
        forced_tool, tool_grammar = tool_grammar_for(request)
        if request.messages is not None:
            if self._formatter is None:
                raise InvalidRequestError(f"model {self._name} has no chat template; use /v1/completions")
            tools: Any = list(request.tools) if request.tools and forced_tool is None else None
            messages: Any = list(request.messages)
            try:
                formatted = self._formatter(messages=messages, tools=tools)
            except Exception as error:  # the template is model-supplied Jinja; any failure is the input's
                raise InvalidRequestError(
                    f"messages cannot be rendered by the chat template: {error}", param="messages"
                ) from error
            prompt_text, add_bos = formatted.prompt, not formatted.added_special
            stops.extend(stop for stop in (formatted.stop or []) if isinstance(stop, str))
            param = "messages"
        else:
            assert request.prompt is not None
            prompt_text, add_bos = request.prompt, llama._model.add_bos_token()
            param = "prompt"
        grammar_text, is_schema = tool_grammar, tool_grammar is not None
        if grammar_text is None and request.response_format:
            grammar_text, is_schema = response_format_grammar(request.response_format)
        if request.continuation and grammar_text is not None:
            # A grammar's state cannot be rebuilt from text produced under it by another engine.
            raise resume_refused("cannot resume a constrained generation")
        prompt = llama.tokenize(prompt_text.encode("utf-8"), add_bos=add_bos, special=True)
        limit = llama.n_ctx()
        if len(prompt) >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens, but the {param} has {len(prompt)} tokens.",
                param=param,
            )
        tokens = prompt
        if request.continuation:
            # Tokenized together, as one generation would have had them; text merges at the seam
            # may make the count differ from the earlier attempt's by a token.
            text = prompt_text + request.continuation
            tokens = llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        continuation_tokens = max(0, len(tokens) - len(prompt))
        max_new = continuation_budget(request.max_tokens, continuation_tokens, room=limit - len(tokens))
        return _Prepared(
            request=request,
            tokens=tokens,
            prompt_tokens=len(prompt),
            continuation_tokens=continuation_tokens,
            max_new_tokens=max_new,
            stops=tuple(stops),
            grammar_text=grammar_text,
            grammar_is_schema=is_schema,
            forced_tool=forced_tool,
        )

    def _run(
        self,
        llama: llama_cpp.Llama,
        prepared: _Prepared,
        emit: Callable[[GenerationChunk | MycellmError], None],
        cancelled: threading.Event,
    ) -> None:
        if cancelled.is_set():
            return
        try:
            self._generate_tokens(llama, prepared, emit, cancelled)
        except MycellmError as error:
            emit(error)
        except Exception as error:  # a llama.cpp failure must reach the caller, not die in this thread
            logger.exception("generation failed")
            emit(EngineError(f"llama.cpp generation failed: {error}"))

    def _generate_tokens(
        self,
        llama: llama_cpp.Llama,
        prepared: _Prepared,
        emit: Callable[[GenerationChunk | MycellmError], None],
        cancelled: threading.Event,
    ) -> None:
        request = prepared.request
        matcher = ContinuationStopMatcher(prepared.stops, request.continuation)
        if request.echo and request.prompt is not None and not request.continuation:
            emit(GenerationChunk(text=request.prompt))
        if prepared.max_new_tokens <= 0 or matcher.stopped:
            # A continuation that used the whole budget (or the context), or ends in a stop string.
            usage = Usage(
                prompt_tokens=prepared.prompt_tokens,
                completion_tokens=prepared.continuation_tokens,
                continuation_tokens=prepared.continuation_tokens,
            )
            emit(GenerationChunk(finish_reason="stop" if matcher.stopped else "length", usage=usage))
            return
        tool_text: list[str] = []

        def send(text: str) -> None:
            if prepared.forced_tool is not None:
                tool_text.append(text)
            else:
                emit(GenerationChunk(text=text))

        if (ended := self._sample(llama, prepared, matcher, send, cancelled)) is None:
            return  # the caller went away
        finish, produced = ended
        tail = matcher.flush()
        usage = Usage(
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=prepared.continuation_tokens + produced,
            continuation_tokens=prepared.continuation_tokens,
        )
        if prepared.forced_tool is None:
            emit(GenerationChunk(text=tail, finish_reason=finish, usage=usage))
        else:
            emit(end_tool_call(prepared.forced_tool, "".join(tool_text) + tail, finish, usage))

    def _sample(
        self,
        llama: llama_cpp.Llama,
        prepared: _Prepared,
        matcher: ContinuationStopMatcher,
        send: Callable[[str], None],
        cancelled: threading.Event,
    ) -> tuple[FinishReason, int] | None:
        """Generate up to the budget, sending text once safe; how it ended and the tokens it made."""
        request = prepared.request
        grammar = compile_grammar(prepared.grammar_text, prepared.grammar_is_schema)
        llama.set_seed(request.seed if request.seed is not None else random.randrange(2**31))
        # Invalid bytes inside the text become U+FFFD; those of a character cut by the end (limit, stop
        # or end of turn) stay pending in the decoder, which is never flushed: they are dropped.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llama._model.vocab
        produced = 0
        for token in llama.generate(
            prepared.tokens,
            temp=request.temperature,
            top_p=request.top_p,
            top_k=40 if request.temperature > 0 else 1,
            min_p=0.05 if request.temperature > 0 else 0.0,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repeat_penalty=1.0,
            grammar=grammar,
        ):
            if cancelled.is_set() or self._closing.is_set():
                return None
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return "stop", produced
            produced += 1
            text = matcher.feed(decoder.decode(llama.detokenize([token])))
            if text:
                send(text)
            if matcher.stopped:
                return "stop", produced
            if produced >= prepared.max_new_tokens:
                return "length", produced
        return "length", produced

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if not self._settings.embeddings:
            raise UnsupportedParameterError(f"model {self._name} does not serve embeddings", param="model")
        llama = self._require_loaded()
        loop = asyncio.get_running_loop()
        async with self._embed_lock:
            if self._embedder is None:
                self._embedder = await loop.run_in_executor(self._embed_thread, self._load, True)
        return await loop.run_in_executor(self._embed_thread, self._embed, llama, self._embedder, request)

    def _embed(
        self, llama: llama_cpp.Llama, embedder: llama_cpp.Llama, request: EmbeddingRequest
    ) -> EmbeddingResult:
        texts: list[str] = []
        counted = 0
        limit = embedder.n_ctx()
        for index, item in enumerate(request.inputs):
            if isinstance(item, str):
                text = item
                count = len(embedder.tokenize(item.encode("utf-8"), add_bos=True, special=False))
            else:
                token_ids = [int(token) for token in item]  # type: ignore[call-overload]
                if any(not 0 <= token < llama.n_vocab() for token in token_ids):
                    raise InvalidRequestError(
                        f"input[{index}] has a token id outside the vocabulary", param="input"
                    )
                text = llama.detokenize(token_ids).decode("utf-8", errors="replace")
                count = len(token_ids)
            if count > limit:
                raise ContextLengthError(
                    f"input[{index}] has {count} tokens; this model embeds at most {limit} tokens per input.",
                    param="input",
                )
            if not text:  # token ids of special tokens only: nothing a model can embed
                raise InvalidRequestError(f"input[{index}] holds no text to embed", param="input")
            counted += count
            texts.append(text)
        try:
            vectors = embedder.embed(texts, normalize=True, truncate=False)
        except (RuntimeError, ValueError) as error:
            raise EngineError(f"llama.cpp embedding failed: {error}") from error
        return EmbeddingResult(
            vectors=tuple(tuple(float(x) for x in vector) for vector in vectors), prompt_tokens=counted
        )
