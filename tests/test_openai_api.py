"""Tests for the OpenAI request and response shapes: parsing, mapping to requests, and JSON output."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from mycellm.api.openai import MAX_BODY_BYTES, ChatCompletionBody, CompletionBody, EmbeddingBody, parse_body
from mycellm.api.responses import chat_chunk_json, embeddings_json, usage_json
from mycellm.errors import InvalidRequestError, UnsupportedParameterError
from mycellm.types import EmbeddingResult, GenerationChunk, ToolCall, Usage

USER = {"role": "user", "content": "Hi"}


def encode(data: Any) -> bytes:
    return json.dumps(data).encode()


def chat(**fields: Any) -> ChatCompletionBody:
    return parse_body(encode({"model": "m", "messages": [USER], **fields}), ChatCompletionBody)


def completion(**fields: Any) -> CompletionBody:
    return parse_body(encode({"model": "m", "prompt": "Once", **fields}), CompletionBody)


def embedding(value: Any) -> EmbeddingBody:
    return parse_body(encode({"model": "e", "input": value}), EmbeddingBody)


# -- parse_body ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "m",}', b"\xff\xfe", b""])
def test_parse_body_rejects_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON") as caught:
        parse_body(raw, ChatCompletionBody)
    assert caught.value.status == 400


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
def test_parse_body_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_body(raw, ChatCompletionBody)


def test_parse_body_rejects_oversized_body() -> None:
    padding = "x" * MAX_BODY_BYTES
    raw = encode({"model": "m", "messages": [{"role": "user", "content": padding}]})
    assert len(raw) > MAX_BODY_BYTES
    with pytest.raises(InvalidRequestError, match="exceeds"):
        parse_body(raw, ChatCompletionBody)


def test_parse_body_accepts_a_body_just_under_the_limit() -> None:
    template = encode({"model": "m", "prompt": ""})
    raw = encode({"model": "m", "prompt": "x" * (MAX_BODY_BYTES - len(template))})
    assert len(raw) == MAX_BODY_BYTES
    assert len(parse_body(raw, CompletionBody).prompt) == MAX_BODY_BYTES - len(template)


@pytest.mark.parametrize("body_type", [ChatCompletionBody, CompletionBody, EmbeddingBody])
def test_parse_body_names_missing_model(body_type: type[Any]) -> None:
    data = {"messages": [USER], "prompt": "p", "input": "i"}
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(encode(data), body_type)
    assert caught.value.param == "model"
    assert "model" in caught.value.message


@pytest.mark.parametrize(
    ("body_type", "data", "param"),
    [
        (CompletionBody, {"model": "m", "prompt": 5}, "prompt"),
        (CompletionBody, {"model": "m", "prompt": [1, "a"]}, "prompt"),
        (ChatCompletionBody, {"model": "m", "messages": [USER], "stop": 5}, "stop"),
        (
            ChatCompletionBody,
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        (ChatCompletionBody, {"model": "m", "messages": [USER], "tool_choice": "always"}, "tool_choice"),
        (EmbeddingBody, {"model": "m", "input": {"text": "x"}}, "input"),
    ],
)
def test_union_field_errors_name_the_field_without_the_union_tag(
    body_type: type[Any], data: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(encode(data), body_type)
    assert caught.value.param == param
    assert caught.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"mycellm": {"prefer": "fleet"}}, "mycellm.prefer"),
        ({"mycellm": {"unknown": True}}, "mycellm.unknown"),
    ],
)
def test_parse_body_names_the_bad_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        chat(**fields)
    assert caught.value.param == param


def test_parse_body_ignores_unknown_top_level_fields() -> None:
    body = chat(metadata={"team": "x"}, store=True)
    assert body.model == "m"
    assert body.model_extra == {"metadata": {"team": "x"}, "store": True}


# -- chat ---------------------------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=10, max_completion_tokens=20).to_request("r", "m").max_tokens == 20
    assert chat(max_tokens=10).to_request("r", "m").max_tokens == 10
    assert chat().to_request("r", "m").max_tokens is None


def test_developer_role_becomes_system() -> None:
    body = chat(messages=[{"role": "developer", "content": "Be brief."}, USER])
    request = body.to_request("req-1", "served-name")
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert request.request_id == "req-1"
    assert request.model == "served-name"


def test_text_content_parts_are_flattened() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    request = chat(messages=[{"role": "user", "content": parts}]).to_request("r", "m")
    assert request.messages == ({"role": "user", "content": "Hello, world"},)


def test_image_content_part_is_unsupported() -> None:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    body = chat(messages=[{"role": "user", "content": parts}])
    with pytest.raises(UnsupportedParameterError) as caught:
        body.to_request("r", "m")
    assert caught.value.param == "messages.content.1"
    assert caught.value.code == "unsupported_parameter"


def test_n_above_one_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        chat(n=2).to_request("r", "m")
    assert caught.value.param == "n"
    assert chat(n=1).to_request("r", "m").max_tokens is None


def test_sampling_fields_reach_the_request() -> None:
    request = chat(temperature=0, top_p=0.5, seed=7, stop="END").to_request("r", "m")
    assert (request.temperature, request.top_p, request.seed, request.stop) == (0.0, 0.5, 7, ("END",))


# -- completions --------------------------------------------------------------------------------


def test_completion_defaults_max_tokens_to_16() -> None:
    request = completion().to_request("r", "m")
    assert request.max_tokens == 16
    assert request.prompt == "Once"
    assert request.messages is None
    assert completion(max_tokens=3).to_request("r", "m").max_tokens == 3


def test_completion_accepts_a_list_of_one_prompt() -> None:
    assert completion(prompt=["Only one"]).to_request("r", "m").prompt == "Only one"


def test_completion_rejects_suffix() -> None:
    with pytest.raises(UnsupportedParameterError) as caught:
        completion(suffix="end").to_request("r", "m")
    assert caught.value.param == "suffix"


def test_completion_rejects_two_prompts() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        completion(prompt=["one", "two"]).to_request("r", "m")
    assert caught.value.param == "prompt"


# -- embeddings ---------------------------------------------------------------------------------


def test_embedding_inputs_from_string() -> None:
    assert embedding("hello").inputs() == ("hello",)


def test_embedding_inputs_from_list_of_strings() -> None:
    assert embedding(["a", "b"]).inputs() == ("a", "b")


def test_embedding_inputs_from_token_ids_are_one_input() -> None:
    assert embedding([1, 2, 3]).inputs() == ((1, 2, 3),)


def test_embedding_inputs_from_lists_of_token_ids() -> None:
    assert embedding([[1, 2], [3]]).inputs() == ((1, 2), (3,))


@pytest.mark.parametrize("value", ["", [], [""], ["a", ""], [[1], []]])
def test_embedding_empty_input_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        embedding(value).inputs()
    assert caught.value.param == "input"


def test_embedding_dimensions_is_unsupported() -> None:
    body = parse_body(encode({"model": "e", "input": "x", "dimensions": 8}), EmbeddingBody)
    with pytest.raises(UnsupportedParameterError) as caught:
        body.inputs()
    assert caught.value.param == "dimensions"


def test_embeddings_json_base64_decodes_to_the_same_floats() -> None:
    vectors = ((0.5, -1.25, 3.0), (0.0, 1e-3, -2.5e6))
    result = EmbeddingResult(vectors=vectors, prompt_tokens=4)
    encoded = embeddings_json("e", result, "base64")
    plain = embeddings_json("e", result, "float")
    assert [item["index"] for item in encoded["data"]] == [0, 1]
    for item, vector, plain_item in zip(encoded["data"], vectors, plain["data"], strict=True):
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 4 * len(vector)
        decoded = [value for (value,) in struct.iter_unpack("<f", raw)]
        assert decoded == pytest.approx(list(vector), rel=1e-6)
        assert plain_item["embedding"] == list(vector)
    assert encoded["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert encoded["object"] == "list" and encoded["model"] == "e"


# -- responses ----------------------------------------------------------------------------------


def test_role_chunk_opens_the_stream() -> None:
    chunk = chat_chunk_json("chatcmpl-1", "m", 1700, None, role=True)
    assert chunk == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
                "logprobs": None,
            }
        ],
    }


def test_text_chunk_carries_only_the_new_text() -> None:
    chunk = chat_chunk_json("chatcmpl-1", "m", 1700, GenerationChunk(text="Hel"))
    assert chunk["choices"][0]["delta"] == {"content": "Hel"}
    assert chunk["choices"][0]["finish_reason"] is None


def test_final_chunk_carries_finish_reason() -> None:
    usage = Usage(prompt_tokens=1, completion_tokens=2)
    chunk = chat_chunk_json("c", "m", 1, GenerationChunk(finish_reason="length", usage=usage))
    assert chunk["choices"][0]["delta"] == {}
    assert chunk["choices"][0]["finish_reason"] == "length"


def test_tool_call_chunk_shape() -> None:
    calls = (
        ToolCall(id="call_1", name="f", arguments='{"x": 1}'),
        ToolCall(id="call_2", name="g", arguments="{}"),
    )
    chunk = chat_chunk_json("c", "m", 1, GenerationChunk(tool_calls=calls, finish_reason="tool_calls"))
    assert chunk["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"


def test_usage_json_totals() -> None:
    assert usage_json(Usage(prompt_tokens=7, completion_tokens=5)) == {
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "total_tokens": 12,
    }
