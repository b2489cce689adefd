"""The InferenceEngine protocol every backend implements, and draining a stream of chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from mycellm.errors import EngineError
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    ToolCall,
    Usage,
)


@runtime_checkable
class InferenceEngine(Protocol):
    """One inference backend owned by one InferenceWorker.

    ``generate`` yields chunks as they come (possibly one per token); the caller coalesces them.
    The last chunk carries ``finish_reason`` and exact ``usage``. Closing the iterator early (or
    cancelling the task that iterates it) stops the generation and frees the engine.
    """

    backend: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[ModelInfo]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """This engine's count of ``request``'s prompt and of ``text`` as completion, or None
        where it has no tokenizer of its own (an upstream): how a consumer checks a seeder's usage."""
        ...


async def collect(chunks: AsyncIterator[GenerationChunk]) -> CompletionResult:
    """Drain a chunk stream into one CompletionResult."""
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    async for chunk in chunks:
        texts.append(chunk.text)
        tool_calls.extend(chunk.tool_calls)
        if chunk.is_final:
            assert chunk.finish_reason is not None
            if chunk.usage is None:
                raise EngineError("the engine ended a generation without usage")
            return CompletionResult(
                text="".join(texts),
                tool_calls=tuple(tool_calls),
                finish_reason=chunk.finish_reason,
                usage=chunk.usage,
            )
    raise EngineError("the engine ended a generation without a finish reason")
