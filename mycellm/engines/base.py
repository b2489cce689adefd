"""The InferenceEngine protocol and the values that cross it (requests, chunks, results)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mycellm.errors import EngineError

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Usage(FrozenModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ToolCall(FrozenModel):
    id: str
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it


class GenerationRequest(FrozenModel):
    """One chat or legacy completion, already validated at the API edge."""

    request_id: str
    model: str
    messages: tuple[dict[str, Any], ...] | None = None  # chat completion
    prompt: str | None = None  # legacy completion
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    echo: bool = False

    @property
    def kind(self) -> Literal["chat", "completion"]:
        return "chat" if self.messages is not None else "completion"


class GenerationChunk(FrozenModel):
    """A piece of a generation: new text and/or tool calls; the last one has finish and usage."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


class CompletionResult(FrozenModel):
    """A whole generation, for non-streaming requests."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason
    usage: Usage


class EmbeddingRequest(FrozenModel):
    request_id: str
    model: str
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]


class EmbeddingResult(FrozenModel):
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int = Field(ge=0)


class ModelInfo(FrozenModel):
    """What a node says about a model it serves."""

    name: str
    backend: str
    context_tokens: int | None = None
    supports_chat: bool = True
    supports_embeddings: bool = False
    supports_tools: bool = False
    tier: str | None = None
    tags: tuple[str, ...] = ()
    owned_by: str = "mycellm"


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
