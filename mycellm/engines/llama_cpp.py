"""llama.cpp engine: any GGUF file (the bundled SmolLM2 by default), chat template from the GGUF, continuous batching."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaSampler

from mycellm.config import ModelSettings
from mycellm.engines.llama_prompts import PreparedRequest, chat_formatter, prepare_request
from mycellm.engines.llama_sampling import build_sampler
from mycellm.engines.llama_scheduler import BatchScheduler
from mycellm.engines.llama_sequence import LlamaSequence
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
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Usage,
)

logger = logging.getLogger(__name__)

# An unset ``parallel``: as many windows as fit in 8192 KV cells, at most 4 (4 of 2048 tokens, 2 of
# 4096, 1 of 8192 or more). What more sequences cost is memory (the KV cache holds parallel x
# window cells, allocated at start), not compute (a free slot decodes nothing), so the rule reads
# the window, not the cores: the cache stays the size of one 8k-token context. 4 because on CPUs
# the aggregate rate gains little past about 4 streams while each stream gets slower.
DEFAULT_PARALLEL_CELLS = 8192
DEFAULT_PARALLEL_MAX = 4
# llama-cpp-python's Llama brings a context of its own; the engine uses it for nothing (the
# batched context is built beside it on the same model), so it is kept as small as llama.cpp allows.
UNUSED_CONTEXT_TOKENS = 256
UNUSED_BATCH_TOKENS = 16


def default_parallel(context_tokens: int) -> int:
    return min(DEFAULT_PARALLEL_MAX, max(1, DEFAULT_PARALLEL_CELLS // context_tokens))


class LlamaCppEngine:
    backend = "llama_cpp"

    def __init__(self, settings: ModelSettings) -> None:
        self._settings = settings
        self._name = model_name_for(settings)
        self._llama: llama_cpp.Llama | None = None
        self._embedder: llama_cpp.Llama | None = None
        self._formatter: Any = None
        self._context: LlamaContext | None = None
        self._scheduler: BatchScheduler | None = None
        # llama.cpp contexts are not thread-safe: the scheduler's thread generates, another embeds.
        self._embed_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-embed")
        self._embed_lock = asyncio.Lock()
        self._path: Path | None = None

    @property
    def threads(self) -> int:
        return self._settings.threads or os.cpu_count() or 1

    @property
    def parallel(self) -> int:
        """Requests decoded together, each in a sequence of its own with a full context window."""
        return self._settings.parallel or default_parallel(self._settings.context_tokens)

    @property
    def context_tokens(self) -> int:
        """The window of one request (the context holds ``parallel`` of them)."""
        return self._settings.context_tokens

    @property
    def _step_tokens(self) -> int:
        """Tokens of one step: ``batch_tokens``, and at least room for a prompt chunk beside every decode."""
        return max(self._settings.batch_tokens, self.parallel + 3)

    @property
    def _chunk_tokens(self) -> int:
        """The longest prompt chunk: one micro-batch (llama.cpp's usual 512 at most)."""
        return min(self._step_tokens, 512)

    @property
    def prompt_tokens_decoded(self) -> int:
        """Prompt tokens decoded so far; a prefix a slot already held is not decoded again."""
        return self._scheduler.prompt_tokens_decoded if self._scheduler is not None else 0

    async def start(self) -> None:
        self._path = resolve_model_path(self._settings.path)
        self._llama = await asyncio.to_thread(self._load, False)
        self._context = await asyncio.to_thread(self._batched_context, self._llama)
        self._formatter = chat_formatter(self._llama, self._settings.chat_template)
        self._scheduler = BatchScheduler(self._context, self.parallel, self._step_tokens, self._chunk_tokens)
        logger.info(
            "loaded %s from %s (%d sequences of %d tokens, %d threads)",
            self._name,
            self._path,
            self.parallel,
            self.context_tokens,
            self.threads,
        )

    def _load(self, embedding: bool) -> llama_cpp.Llama:
        assert self._path is not None
        options: dict[str, Any] = {
            "model_path": str(self._path),
            "n_ctx": UNUSED_CONTEXT_TOKENS,
            "n_batch": UNUSED_BATCH_TOKENS,
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
                "n_ctx": self._settings.context_tokens,
                "n_batch": self._settings.context_tokens,
                "n_ubatch": self._settings.context_tokens,
            }
        try:
            return llama_cpp.Llama(**options)
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"llama.cpp could not load {self._path}: {error}") from error

    def _batched_context(self, llama: llama_cpp.Llama) -> LlamaContext:
        """A context of ``parallel`` separate KV streams of a full window each, on the loaded model,
        with the Llama's other settings (threads, no flash attention: the same numbers as before)."""
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx = self.parallel * self.context_tokens
        params.n_seq_max = self.parallel
        params.kv_unified = False  # each sequence attends over its own cells only
        params.n_batch = self._step_tokens
        params.n_ubatch = self._chunk_tokens
        try:
            return LlamaContext(model=llama._model, params=params, verbose=False)
        except ValueError as error:
            raise EngineError(f"llama.cpp could not make a context for {self._path}: {error}") from error

    async def close(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        # Contexts are freed only once no thread uses them (freeing one mid-decode crashes the process).
        await asyncio.to_thread(self._embed_thread.shutdown, wait=True, cancel_futures=True)
        if self._context is not None:
            self._context.close()
        for llama in (self._llama, self._embedder):
            if llama is not None:
                llama.close()
        self._llama = self._embedder = None
        self._context = self._scheduler = None

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
        llama, scheduler = self._require_loaded()
        prepared, sampler = await asyncio.to_thread(self._open, llama, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | MycellmError] = asyncio.Queue()

        def emit(item: GenerationChunk | MycellmError) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        vocab = llama._model.vocab
        sequence = LlamaSequence(
            prepared,
            sampler,
            emit,
            detokenize=lambda token: llama.detokenize([token]),
            is_end=lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
        )
        try:
            if not sequence.start():
                sequence.close()  # it ended before any token: nothing to decode
            else:
                try:
                    scheduler.submit(sequence)
                except EngineError:
                    sequence.close()
                    raise
            while True:
                item = await queue.get()
                if isinstance(item, MycellmError):
                    raise item
                yield item
                if item.is_final:
                    return
        finally:
            sequence.cancelled.set()
            scheduler.wake()

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

    def _require_loaded(self) -> tuple[llama_cpp.Llama, BatchScheduler]:
        if self._llama is None or self._scheduler is None:
            raise EngineError(f"model {self._name} is not loaded")
        return self._llama, self._scheduler

    def _prepare(self, llama: llama_cpp.Llama, request: GenerationRequest) -> PreparedRequest:
        return prepare_request(llama, self._formatter, request, self._name, self.context_tokens)

    def _open(
        self, llama: llama_cpp.Llama, request: GenerationRequest
    ) -> tuple[PreparedRequest, LlamaSampler]:
        prepared = self._prepare(llama, request)
        return prepared, build_sampler(llama._model, prepared)

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if not self._settings.embeddings:
            raise UnsupportedParameterError(f"model {self._name} does not serve embeddings", param="model")
        llama, _ = self._require_loaded()
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
