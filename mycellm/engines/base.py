"""The InferenceEngine protocol and the values that cross it (requests, chunks, results)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mycellm.engines.stops import StopMatcher
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
    """One chat or legacy completion, already validated at the API edge.

    ``continuation`` resumes a generation that broke off (its node died): it is the answer text an
    earlier attempt already sent to the client. The engine builds the prompt as it would without it
    (chat template with the generation prompt, or the completion prompt), appends the continuation
    and streams only what comes after it. ``max_tokens`` bounds the whole answer, continuation
    included, and the final usage covers the whole answer as if it had been one generation:
    ``prompt_tokens`` without the continuation, ``completion_tokens`` with it. A stop string that
    starts in the continuation and ends in new text still stops. A resumed request never echoes
    the prompt again (the earlier attempt sent it), so with ``echo`` the continuation holds the
    answer only, without the echoed prompt. Constrained generations (a JSON response_format or a
    forced tool call) cannot be resumed: engines refuse them with an EngineError whose code is
    ``resume_unsupported``.
    """

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
    continuation: str = ""  # answer text already sent by an earlier attempt; see the class docstring

    @property
    def kind(self) -> Literal["chat", "completion"]:
        return "chat" if self.messages is not None else "completion"


RESUME_UNSUPPORTED = "resume_unsupported"  # the error code of an engine that cannot resume a request


def resume_refused(reason: str) -> EngineError:
    """The error an engine raises for a continuation it cannot honour."""
    return EngineError(reason, code=RESUME_UNSUPPORTED)


def continuation_budget(max_tokens: int | None, continuation_tokens: int, room: int) -> int:
    """New tokens a resumed generation may produce: what max_tokens leaves after the continuation,
    at most the room left in the context window; zero or less means it must end at once."""
    if max_tokens is None:
        return room
    return min(max_tokens - continuation_tokens, room)


class ContinuationStopMatcher:
    """A StopMatcher for a resumed generation that never emits the continuation again.

    It starts with the tail of the continuation in its history (at most the longest stop string
    less one character: enough for any stop string that straddles the boundary), so a stop that
    begins in the continuation and ends in new text still stops. Whatever of that tail the matcher
    holds back and later releases was already sent by the earlier attempt, so it is dropped.
    """

    def __init__(self, stops: tuple[str, ...] | list[str], continuation: str = "") -> None:
        self._matcher = StopMatcher(stops)
        longest = max((len(stop) for stop in stops if stop), default=0)
        tail = continuation[max(0, len(continuation) - (longest - 1)) :] if longest > 1 else ""
        self._already_sent = len(tail) - len(self._matcher.feed(tail))

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def feed(self, text: str) -> str:
        return self._drop_already_sent(self._matcher.feed(text))

    def flush(self) -> str:
        return self._drop_already_sent(self._matcher.flush())

    def _drop_already_sent(self, text: str) -> str:
        # The matcher releases text in order, so the held tail of the continuation comes first.
        dropped = min(self._already_sent, len(text))
        self._already_sent -= dropped
        return text[dropped:]


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
