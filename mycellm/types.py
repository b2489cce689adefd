"""Values that cross every seam: generation requests, chunks, results, usage, models, ids."""

from __future__ import annotations

from typing import Any, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field

# Identifiers: plain strings on the wire and in the database, distinct types in the code.
PeerId = NewType("PeerId", str)  # SHA-256 (hex) of a device's public key
AccountId = NewType("AccountId", str)  # SHA-256 (hex) of an account's public key
RequestId = NewType("RequestId", str)  # chatcmpl-..., cmpl-..., embd-...; unique per request
NetworkId = NewType("NetworkId", str)  # the network a link, request or receipt belongs to

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Usage(FrozenModel):
    """Tokens of one answer. ``continuation_tokens``: of ``completion_tokens``, those a resumed
    generation was given (an earlier attempt produced them); the node that resumed read them as
    prompt, and is paid for them as prompt (``billed``)."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    continuation_tokens: int = Field(default=0, ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def billed(self) -> Usage:
        """What the node that produced this answer is paid for: the continuation as prompt."""
        continuation = min(self.continuation_tokens, self.completion_tokens)
        return Usage(
            prompt_tokens=self.prompt_tokens + continuation,
            completion_tokens=self.completion_tokens - continuation,
        )


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

    request_id: RequestId
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
    network_id: NetworkId | None = None  # the network it runs in; None: the node's default network

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
    request_id: RequestId
    model: str
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    network_id: NetworkId | None = None  # as GenerationRequest.network_id


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
