"""OpenAI request bodies: lenient at the edge (unknown fields logged), strict inside."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    field_validator,
)
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from mycellm.errors import InvalidRequestError, UnsupportedParameterError
from mycellm.routing.ranking import RoutingOptions
from mycellm.types import (
    GenerationRequest,
    RequestId,
)

logger = logging.getLogger(__name__)


MAX_BODY_BYTES = 8 * 1024 * 1024


BodyT = TypeVar("BodyT", bound=BaseModel)


def _json_number(message: str) -> BeforeValidator:
    """Only a JSON number passes: pydantic's lax mode would take "3" and true as numbers too.

    Booleans are ``StrictBool`` for the same reason (no 0, 1 or "yes"). The JSON Schemas in the
    OpenAPI document say integer, number and boolean; these types make the bodies agree.
    """

    def check(value: Any) -> Any:
        if isinstance(value, bool | str):
            raise PydanticCustomError("json_type", message)
        return value

    return BeforeValidator(check)


_JSON_INT = _json_number("Input should be a valid integer")
_JSON_NUMBER = _json_number("Input should be a valid number")
# Bounds come before the check, so that they reach the JSON Schema as minimum and maximum.
JsonInt = Annotated[int, _JSON_INT]
JsonNumber = Annotated[float, _JSON_NUMBER]
PositiveInt = Annotated[int, Field(ge=1), _JSON_INT]
Temperature = Annotated[float, Field(ge=0.0, le=2.0), _JSON_NUMBER]
Probability = Annotated[float, Field(ge=0.0, le=1.0), _JSON_NUMBER]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0), _JSON_NUMBER]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


def _json_schema_needs_schema(schema: dict[str, Any]) -> None:
    # The engines refuse a json_schema format whose json_schema.schema is not an object.
    schema["if"] = {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]}
    schema["then"] = {
        "required": ["json_schema"],
        "properties": {
            "json_schema": {
                "type": "object",
                "required": ["schema"],
                "properties": {"schema": {"type": "object", "description": "A JSON Schema"}},
            }
        },
    }


class ResponseFormat(_Lenient):
    model_config = ConfigDict(extra="allow", json_schema_extra=_json_schema_needs_schema)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    """A ``tool_choice`` that forces a call of the named function."""

    type: Literal["function"] = "function"
    function: NamedFunction


def _tool_choice_kind(value: Any) -> str:
    return "dict" if isinstance(value, dict | NamedToolChoice) else "str"


# Tagged "str" and "dict" so that an error names the field, not the union member (see _UNION_TAGS).
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")] | Annotated[NamedToolChoice, Tag("dict")],
    Discriminator(_tool_choice_kind),
]

# Only text parts are supported (see _flatten_content).
_TEXT_PART_SCHEMA: JsonDict = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART_SCHEMA}, {"type": "null"}]
        },
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as a chat template expects it: text content only."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = _flatten_content(self.content)
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _flatten_content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedParameterError(
                f"content part of type {part.get('type')!r} is not supported; only text parts are",
                param=f"messages.content.{index}",
            )
        texts.append(part["text"])
    return "".join(texts)


# The document states what check_supported and to_request refuse, next to the field they check.
_ONLY_ONE: JsonDict = {"maximum": 1}
_NO_LOGPROBS: JsonDict = {
    "anyOf": [{"type": "boolean", "const": False}, {"type": "integer", "const": 0}, {"type": "null"}]
}
_MODEL_DESCRIPTION = "A model id from /v1/models, or auto for the best model the network serves"


class _SamplingBody(_Lenient):
    model: str = Field(min_length=1, max_length=256, description=_MODEL_DESCRIPTION, examples=["auto"])
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: PositiveInt | None = Field(default=None, json_schema_extra=_ONLY_ONE)
    seed: JsonInt | None = None
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"maxItems": 4})
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: StrictBool | JsonInt | None = Field(default=None, json_schema_extra=_NO_LOGPROBS)
    user: str | None = None
    mycellm: RoutingOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def check_supported(self) -> None:
        if self.n is not None and self.n > 1:
            raise InvalidRequestError("n > 1 is not supported; send separate requests", param="n")
        if self.logprobs:
            raise UnsupportedParameterError("logprobs are not supported by this node", param="logprobs")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> dict[str, Any]:
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": self.stops(),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
        }


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def to_request(self, request_id: RequestId, model: str) -> GenerationRequest:
        self.check_supported()
        return GenerationRequest(
            request_id=request_id,
            model=model,
            messages=tuple(message.plain() for message in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            response_format=self.response_format.model_dump(exclude_none=True)
            if self.response_format
            else None,
            tools=tuple(tool.model_dump(exclude_none=True) for tool in self.tools) if self.tools else None,
            tool_choice=self.tool_choice.model_dump()
            if isinstance(self.tool_choice, NamedToolChoice)
            else self.tool_choice,
            **self.sampling(),
        )


class CompletionBody(_SamplingBody):
    prompt: str | list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
            ]
        },
    )
    echo: StrictBool = False
    suffix: str | None = Field(
        default=None, json_schema_extra={"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]}
    )
    best_of: PositiveInt | None = Field(default=None, json_schema_extra=_ONLY_ONE)

    def to_request(self, request_id: RequestId, model: str) -> GenerationRequest:
        self.check_supported()
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequestError("only one prompt per request is supported", param="prompt")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        if self.suffix:
            raise UnsupportedParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of is not None and self.best_of > 1:
            raise InvalidRequestError("best_of > 1 is not supported", param="best_of")
        return GenerationRequest(
            request_id=request_id,
            model=model,
            prompt=prompt,
            max_tokens=self.max_tokens or 16,  # the legacy API's default
            echo=self.echo,
            **self.sampling(),
        )


_TOKEN_IDS: JsonDict = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_EMBEDDING_INPUT: JsonDict = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2048},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 2048},
    ],
    "description": "One text, several texts, one input as token ids, or several inputs as token ids",
}


class EmbeddingBody(_Lenient):
    model: str = Field(min_length=1, max_length=256, description=_MODEL_DESCRIPTION, examples=["auto"])
    input: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(json_schema_extra=_EMBEDDING_INPUT)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = Field(
        default=None, json_schema_extra={"anyOf": [{"type": "null"}], "description": "Not supported"}
    )
    user: str | None = None
    mycellm: RoutingOptions | None = None

    def inputs(self) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
        if self.dimensions is not None:
            raise UnsupportedParameterError("dimensions is not supported", param="dimensions")
        value = self.input
        if isinstance(value, str):
            items: tuple[Any, ...] = (value,)
        elif value and all(isinstance(item, int) for item in value):
            items = (tuple(value),)  # one input given as token ids
        elif value and all(isinstance(item, list) for item in value):
            items = tuple(tuple(item) for item in value)  # type: ignore[arg-type]
        else:
            items = tuple(value)
        if not items or any(len(item) == 0 for item in items):
            raise InvalidRequestError("input must not be empty", param="input")
        if len(items) > 2048:
            raise InvalidRequestError("at most 2048 inputs per request", param="input")
        return items


def parse_body(raw: bytes, body_type: type[BodyT]) -> BodyT:
    """Decode and validate a JSON body; InvalidRequestError names the first bad field."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequestError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        body = body_type.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        raise InvalidRequestError(f"{field}: {first['msg']}", param=field or None) from error
    if body.model_extra:
        logger.info("ignoring unknown fields %s", sorted(body.model_extra))
    return body


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location (``prompt.list[str]``); drop it."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-"))
