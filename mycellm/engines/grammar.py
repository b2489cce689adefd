"""Constrained generation for llama.cpp: GBNF grammars for JSON output and forced tool calls."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from mycellm.engines.base import GenerationRequest
from mycellm.errors import InvalidRequestError, UnsupportedParameterError


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
    except (ValueError, RuntimeError) as error:
        raise InvalidRequestError(
            f"the JSON schema cannot be turned into a grammar: {error}", param="response_format"
        ) from error
