"""A generation request for llama.cpp turned into prompt tokens, stops, grammar and budget, checked against the window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from mycellm.engines.continuation import continuation_budget, resume_refused
from mycellm.engines.grammar import response_format_grammar, tool_grammar_for
from mycellm.errors import ContextLengthError, InvalidRequestError
from mycellm.types import GenerationRequest


@dataclass(frozen=True)
class PreparedRequest:
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


def chat_formatter(llama: llama_cpp.Llama, template: str | None) -> Jinja2ChatFormatter | None:
    """The chat formatter of ``template`` (else the GGUF's own), or None where the model has none."""
    template = template or llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    model = llama._model
    eos, bos = llama.token_eos(), llama.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=model.token_get_text(eos) if eos != -1 else "",
        bos_token=model.token_get_text(bos) if bos != -1 else "",
    )


def _prompt_text(
    llama: llama_cpp.Llama,
    formatter: Jinja2ChatFormatter | None,
    request: GenerationRequest,
    name: str,
    forced_tool: str | None,
) -> tuple[str, bool, list[str], str]:
    """The prompt's text, whether to add BOS, the template's stop strings, and the parameter it came from."""
    if request.messages is None:
        assert request.prompt is not None
        return request.prompt, llama._model.add_bos_token(), [], "prompt"
    if formatter is None:
        raise InvalidRequestError(f"model {name} has no chat template; use /v1/completions")
    tools: Any = list(request.tools) if request.tools and forced_tool is None else None
    messages: Any = list(request.messages)
    try:
        formatted = formatter(messages=messages, tools=tools)
    except Exception as error:  # the template is model-supplied Jinja; any failure is the input's
        raise InvalidRequestError(
            f"messages cannot be rendered by the chat template: {error}", param="messages"
        ) from error
    stops = [stop for stop in (formatted.stop or []) if isinstance(stop, str)]
    return formatted.prompt, not formatted.added_special, stops, "messages"


def prepare_request(
    llama: llama_cpp.Llama,
    formatter: Jinja2ChatFormatter | None,
    request: GenerationRequest,
    name: str,
    window: int,
) -> PreparedRequest:
    """``request`` as tokens for one sequence of at most ``window`` tokens (the per-request context)."""
    forced_tool, tool_grammar = tool_grammar_for(request)
    prompt_text, add_bos, template_stops, param = _prompt_text(llama, formatter, request, name, forced_tool)
    grammar_text, is_schema = tool_grammar, tool_grammar is not None
    if grammar_text is None and request.response_format:
        grammar_text, is_schema = response_format_grammar(request.response_format)
    if request.continuation and grammar_text is not None:
        # A grammar's state cannot be rebuilt from text produced under it by another engine.
        raise resume_refused("cannot resume a constrained generation")
    prompt = llama.tokenize(prompt_text.encode("utf-8"), add_bos=add_bos, special=True)
    if not prompt:
        raise InvalidRequestError(f"the {param} is empty", param=param)
    if len(prompt) >= window:
        raise ContextLengthError(
            f"This model's maximum context length is {window} tokens, but the {param} has {len(prompt)} tokens.",
            param=param,
        )
    tokens = prompt
    if request.continuation:
        # Tokenized together, as one generation would have had them; text merges at the seam
        # may make the count differ from the earlier attempt's by a token.
        text = prompt_text + request.continuation
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    continuation_tokens = max(0, len(tokens) - len(prompt))
    max_new = continuation_budget(request.max_tokens, continuation_tokens, room=window - len(tokens))
    return PreparedRequest(
        request=request,
        tokens=tokens,
        prompt_tokens=len(prompt),
        continuation_tokens=continuation_tokens,
        max_new_tokens=max_new,
        stops=(*request.stop, *template_stops),
        grammar_text=grammar_text,
        grammar_is_schema=is_schema,
        forced_tool=forced_tool,
    )
