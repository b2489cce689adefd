"""Constrained generation for llama.cpp: GBNF grammars for JSON output and forced tool calls."""

from __future__ import annotations

import json
import uuid
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from mycellm.errors import InvalidRequestError, UnsupportedParameterError
from mycellm.types import FinishReason, GenerationChunk, GenerationRequest, ToolCall, Usage


def tool_grammar_for(request: GenerationRequest) -> tuple[str | None, str | None]:
    """A forced tool call becomes a grammar over that function's arguments."""
    if not request.tools or request.tool_choice in (None, "auto", "none"):
        return None, None
    functions = {tool["function"]["name"]: tool["function"] for tool in request.tools}
    choice = request.tool_choice
    if choice == "required":
        if len(functions) != 1:
            raise UnsupportedParameterError(
                "tool_choice 'required' with several tools is not supported by the llama.cpp engine; "
                "name the function in tool_choice",
                param="tool_choice",
            )
        name = next(iter(functions))
    elif isinstance(choice, dict):
        name = choice.get("function", {}).get("name", "")
    else:
        raise InvalidRequestError(f"unknown tool_choice {choice!r}", param="tool_choice")
    if name not in functions:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    schema = functions[name].get("parameters") or {"type": "object"}
    return name, json.dumps(schema)


def end_tool_call(name: str, arguments: str, finish: FinishReason, usage: Usage) -> GenerationChunk:
    """The last chunk of a forced tool call: the call, and how its generation ended.

    A call cut by the token limit ends with "length", as OpenAI's does, and keeps its partial
    arguments (not valid JSON): OpenAI returns them too, and streams them before the finish reason
    is known, so a streamed answer cannot take them back; a whole answer keeps them as well, so
    both say the same. "tool_calls" thus always comes with complete arguments.
    """
    call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments)
    reason: FinishReason = "length" if finish == "length" else "tool_calls"
    return GenerationChunk(tool_calls=(call,), finish_reason=reason, usage=usage)


def response_format_grammar(response_format: dict[str, Any]) -> tuple[str | None, bool]:
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None, False
    if kind == "json_object":
        return JSON_GBNF, False
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be an object", param="response_format"
            )
        return json.dumps(schema), True
    raise InvalidRequestError(f"unknown response_format type {kind!r}", param="response_format.type")


_LOOSE_CHAR_RULE = r'char ::= [^"\\] |'
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] |'


def compile_grammar(text: str | None, is_schema: bool) -> LlamaGrammar | None:
    if text is None:
        return None
    try:
        if is_schema:
            # llama-cpp-python's converter lets raw control characters into strings, which makes
            # invalid JSON (a newline inside a string); JSON forbids them, so the grammar must too.
            text = json_schema_to_gbnf(text).replace(_LOOSE_CHAR_RULE, _STRICT_CHAR_RULE)
        return LlamaGrammar.from_string(text, verbose=False)
    # The converter asserts on schemas it does not know ({"type": "foo"}) and trips over odd
    # shapes; any of these is the request's fault, not the engine's.
    except (ValueError, RuntimeError, AssertionError, AttributeError, KeyError, TypeError) as error:
        raise InvalidRequestError(
            f"the JSON schema cannot be turned into a grammar: {error}", param="response_format"
        ) from error
