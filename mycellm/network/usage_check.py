"""What a consumer signs for: the usage a seeder reports, checked against what actually arrived.

A seeder reports its usage in the ``done`` frame, and the consumer would sign a receipt for it. The
consumer never signs more completion tokens than the request's ``max_tokens`` allowed, nor more than
the text it received can hold: every generated token a detokenizer turns into text yields at least
one byte (byte-level vocabularies included), so the bytes received (and the continuation an earlier
attempt sent, for a resumed answer) bound the tokens, plus the end-of-generation tokens that print
nothing. Prompt tokens are bounded by the bytes of the request's text and tools plus a chat
template's markup. A seeder that reports more is told so (``usage_refused``), is not paid, and the
refusal counts against it; the client is shown the usage within the bounds.

Where this node serves the same model, its own tokenizer counts the request's prompt and the text
received (``counted``), and the bounds close in on that count: a retokenized answer may differ
from the tokens sampled by a few (a sampled split that is not the tokenizer's own), a stop string
cut from the text was still generated, and a seeder may render its chat template differently, so
each keeps a small margin; the byte bounds still hold where they are tighter.
"""

from __future__ import annotations

import json

from mycellm.types import GenerationRequest, Usage

SILENT_TOKENS = 2  # end-of-generation tokens that print nothing
TEMPLATE_TOKENS = 512  # a chat template's system prompt and markup
PER_MESSAGE_TOKENS = 16
RETOKENIZE_SLACK = 4  # a sampled token split the tokenizer would not make, plus a dropped partial character
TOOL_CALL_TOKENS = 8  # the markup around each tool call's name and arguments
TEMPLATE_SLACK = 32  # a seeder's chat template may differ from ours in a system line


def _bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode())
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def usage_bounds(
    request: GenerationRequest, received_bytes: int, counted: Usage | None = None, tool_calls: int = 0
) -> Usage:
    """The most prompt and completion tokens the consumer will sign for this answer; ``counted``
    is this node's own tokenizer's count of the prompt and of the text received, if it has one."""
    messages = request.messages or ()
    prompt = (
        _bytes(request.prompt or "")
        + sum(_bytes(message) for message in messages)
        + (_bytes(list(request.tools)) if request.tools else 0)
        + PER_MESSAGE_TOKENS * len(messages)
        + TEMPLATE_TOKENS
    )
    completion = received_bytes + _bytes(request.continuation) + SILENT_TOKENS
    if counted is not None:
        prompt = min(prompt, counted.prompt_tokens + counted.prompt_tokens // 10 + TEMPLATE_SLACK)
        longest_stop = max((len(stop.encode()) for stop in request.stop), default=0)
        completion = min(
            completion,
            counted.completion_tokens
            + counted.completion_tokens // 20
            + SILENT_TOKENS
            + RETOKENIZE_SLACK
            + longest_stop
            + TOOL_CALL_TOKENS * tool_calls,
        )
    if request.max_tokens is not None:
        completion = min(completion, request.max_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def inflated(
    request: GenerationRequest,
    usage: Usage,
    received_bytes: int,
    counted: Usage | None = None,
    tool_calls: int = 0,
) -> str | None:
    """Why ``usage`` claims more than this answer can hold, or None if it is within the bounds."""
    bounds = usage_bounds(request, received_bytes, counted, tool_calls)
    measure = f"{received_bytes} bytes of text" + (
        "" if counted is None else f", {counted.completion_tokens} tokens by this node's tokenizer"
    )
    if usage.completion_tokens > bounds.completion_tokens:
        return (
            f"{usage.completion_tokens} completion tokens claimed for {measure} "
            f"(at most {bounds.completion_tokens}, max_tokens {request.max_tokens})"
        )
    if usage.prompt_tokens > bounds.prompt_tokens:
        return f"{usage.prompt_tokens} prompt tokens claimed; the request can hold at most {bounds.prompt_tokens}"
    return None


def within_bounds(
    request: GenerationRequest,
    usage: Usage,
    received_bytes: int,
    counted: Usage | None = None,
    tool_calls: int = 0,
) -> Usage:
    """``usage`` capped at the bounds: what the client is shown after a refused claim."""
    bounds = usage_bounds(request, received_bytes, counted, tool_calls)
    completion = min(usage.completion_tokens, bounds.completion_tokens)
    return Usage(
        prompt_tokens=min(usage.prompt_tokens, bounds.prompt_tokens),
        completion_tokens=completion,
        continuation_tokens=min(usage.continuation_tokens, completion),
    )
