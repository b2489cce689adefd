"""An OpenAI-compatible upstream's generation stream: its SSE lines, its events as state, its last chunk."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mycellm.engines.upstream_wire import error_fields, estimate_tokens, parse_json
from mycellm.errors import UpstreamError
from mycellm.types import FinishReason, GenerationChunk, GenerationRequest, ToolCall, Usage

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
SSE_FIELDS = ("event:", "id:", "retry:")


def parse_sse_line(line: str, base_url: str) -> dict[str, Any] | str | None:
    """One SSE line: None for lines without data, ``"[DONE]"``, or the decoded event."""
    line = line.strip()
    if not line or line.startswith(":") or line.startswith(SSE_FIELDS):
        return None
    if not line.startswith("data:"):
        raise UpstreamError(f"upstream {base_url} sent a malformed event stream: {line[:80]!r}")
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return data
    return parse_json(data, base_url)


@dataclass
class ToolCallParts:
    """One tool call as its streamed pieces arrive."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    """What a stream has said so far, beyond the text already yielded."""

    base_url: str  # the upstream, named in error messages
    redact: Callable[[str], str]  # removes the API key from text the upstream sends back
    finish_reason: str | None = None
    reported_usage: dict[str, Any] | None = None
    characters: int = 0  # generated text and tool arguments, for estimating usage
    deltas: int = 0
    continuation_tokens: int = 0  # the estimated tokens of a resumed request's continuation
    tool_calls: dict[int, ToolCallParts] = field(default_factory=dict)

    def absorb(self, event: dict[str, Any], request: GenerationRequest) -> str:
        """Fold one event (a stream chunk or a whole response) into the state; return its new text."""
        if event.get("error"):
            message, _, _ = error_fields(event)
            raise UpstreamError(f"upstream {self.base_url} failed mid-generation: {self.redact(message)}")
        if isinstance(event.get("usage"), dict):
            self.reported_usage = event["usage"]
        choices = event.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise UpstreamError(f"upstream {self.base_url} sent malformed choices")
        texts: list[str] = []
        for choice in choices:
            if choice.get("index") not in (0, None):
                continue  # we always ask for one choice
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            if request.kind == "completion":
                text = choice.get("text")
                calls: list[Any] = []
            else:
                delta = choice.get("delta") or choice.get("message") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                calls = (delta.get("tool_calls") if isinstance(delta, dict) else None) or []
            if isinstance(text, str) and text:
                texts.append(text)
                self.deltas += 1
                self.characters += len(text)
            for position, call in enumerate(calls):
                self._absorb_tool_call(position, call)
        return "".join(texts)

    def _absorb_tool_call(self, position: int, call: Any) -> None:
        # Streamed deltas carry an index; a whole (non-streamed) message lists calls in order.
        index = call.get("index", position) if isinstance(call, dict) else None
        function = (call.get("function") or {}) if isinstance(call, dict) else None
        if not isinstance(index, int) or not isinstance(function, dict):
            raise UpstreamError(f"upstream {self.base_url} sent a malformed tool call")
        parts = self.tool_calls.setdefault(index, ToolCallParts())
        if call.get("id"):
            parts.id = str(call["id"])
        if function.get("name") and not parts.name:
            parts.name = str(function["name"])
        if function.get("arguments"):
            arguments = function["arguments"]
            parts.arguments.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
            self.deltas += 1
            self.characters += len(parts.arguments[-1])

    def final_chunk(
        self, request: GenerationRequest, warn_estimate: Callable[[str], None]
    ) -> GenerationChunk:
        """The last chunk: finish reason, tool calls and usage; ``warn_estimate`` hears of estimates."""
        if self.finish_reason is None:
            raise UpstreamError(f"upstream {self.base_url} ended the stream before the generation finished")
        calls: list[ToolCall] = []
        for _, parts in sorted(self.tool_calls.items()):
            if not parts.name:
                raise UpstreamError(f"upstream {self.base_url} sent a tool call without a function name")
            call_id = parts.id or f"call_{uuid.uuid4().hex[:24]}"
            calls.append(ToolCall(id=call_id, name=parts.name, arguments="".join(parts.arguments)))
        return GenerationChunk(
            tool_calls=tuple(calls),
            finish_reason=FINISH_REASONS.get(self.finish_reason, "stop"),
            usage=self._usage(request, warn_estimate),
        )

    def _usage(self, request: GenerationRequest, warn_estimate: Callable[[str], None]) -> Usage:
        """The upstream's usage; where it sends none (or a zero prompt count), an estimate.

        The estimate is a quarter token per character of the prompt (the messages as JSON, whose
        overhead stands in for the chat template) and of the output, and at least one token per
        streamed delta. It is reported to ``warn_estimate``, because the ledger bills it.

        A resumed request adds the continuation's estimated tokens to the completion. The prompt
        count stays the upstream's, which includes the continuation (it was sent as prompt): the
        continuation is counted twice, which is kept over subtracting an estimate from the
        upstream's exact count, since that could undercount the prompt.
        """
        reported = self.reported_usage or {}
        prompt, completion = reported.get("prompt_tokens"), reported.get("completion_tokens")
        if request.messages is not None:
            prompt_text = json.dumps([*request.messages, *(request.tools or ())], default=str)
        else:
            prompt_text = request.prompt or ""
        if isinstance(prompt, int) and prompt >= 0 and (prompt > 0 or not prompt_text):
            prompt_tokens = prompt
        else:
            prompt_tokens = estimate_tokens(prompt_text)
            warn_estimate("prompt")
        if isinstance(completion, int) and completion >= 0:
            completion_tokens = completion
        else:
            completion_tokens = max(self.deltas, self.characters // 4)
            warn_estimate("completion")
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens + self.continuation_tokens,
            continuation_tokens=self.continuation_tokens,
        )
