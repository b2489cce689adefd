"""Every endpoint refuses bad input with an OpenAI-shaped error, and the node keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.node


def post(node, path: str, body: object | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            f"{node.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60
        )
    return httpx.post(f"{node.url}{path}", json=body, timeout=60)


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "auto"}, "messages"),
        ({"model": "auto", "messages": []}, "messages"),
        ({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "top_p": -1}, "top_p"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (
            {
                "model": "auto",
                "messages": [{"role": "user", "content": "x"}],
                "stop": ["a", "b", "c", "d", "e"],
            },
            "stop",
        ),
        (
            {
                "model": "auto",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "xml"},
            },
            "response_format.type",
        ),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes please"}, "stream"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {
                "model": "auto",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages.content.0",
        ),
        (
            {"model": "auto", "messages": [{"role": "user", "content": "x"}], "mycellm": {"prefer": "moon"}},
            "mycellm.prefer",
        ),
    ],
)
def test_chat_rejects_bad_fields(node, body: dict, param: str) -> None:
    assert_error(post(node, CHAT, body), 400, param=param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(node, raw: bytes) -> None:
    for path in (CHAT, "/v1/completions", "/v1/embeddings"):
        assert_error(post(node, path, raw), 400)


def test_unknown_model_is_404_everywhere(node) -> None:
    assert_error(
        post(node, CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        404,
        "model",
        "model_not_found",
    )
    assert_error(post(node, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(post(node, "/v1/embeddings", {"model": "nope", "input": "x"}), 404, "model")
    assert_error(httpx.get(f"{node.url}/v1/models/nope", timeout=10), 404)
    assert_error(httpx.get(f"{node.url}/v1/no/such/path", timeout=10), 404)


def test_prompt_longer_than_context(node, model_name: str) -> None:
    long_text = "word " * 3000
    error = assert_error(
        post(node, CHAT, {"model": model_name, "messages": [{"role": "user", "content": long_text}]}),
        400,
        code="context_length_exceeded",
    )
    assert "2048" in error["message"]
    error = assert_error(
        post(node, "/v1/completions", {"model": model_name, "prompt": long_text, "stream": True}),
        400,
        code="context_length_exceeded",
    )
    assert "2048" in error["message"]
    assert_error(
        post(node, "/v1/embeddings", {"model": model_name, "input": long_text}),
        400,
        "input",
        "context_length_exceeded",
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto"}, "prompt"),
        ({"model": "auto", "prompt": 42}, "prompt"),
        ({"model": "auto", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "auto", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "auto", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "auto", "prompt": "x", "logprobs": 2}, "logprobs"),
    ],
)
def test_completions_reject_bad_fields(node, body: dict, param: str) -> None:
    assert_error(post(node, "/v1/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto"}, "input"),
        ({"model": "auto", "input": ""}, "input"),
        ({"model": "auto", "input": []}, "input"),
        ({"model": "auto", "input": [[]]}, "input"),
        ({"model": "auto", "input": [[-5, 3]]}, "input"),
        ({"model": "auto", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "auto", "input": "x", "dimensions": 8}, "dimensions"),
    ],
)
def test_embeddings_reject_bad_fields(node, body: dict, param: str) -> None:
    assert_error(post(node, "/v1/embeddings", body), 400, param=param)


def test_tool_choice_naming_an_unknown_tool(node, model_name: str) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "b"}},
    }
    assert_error(post(node, CHAT, body), 400, param="tool_choice")


def test_node_requests_limit_checked(node) -> None:
    assert_error(
        httpx.get(f"{node.url}/v1/node/requests", params={"limit": 0}, timeout=10), 400, param="limit"
    )
    assert_error(httpx.get(f"{node.url}/v1/node/requests", params={"limit": "many"}, timeout=10), 400)


def test_rejected_requests_change_no_state_and_node_keeps_serving(
    node, client: openai.OpenAI, model_name: str
) -> None:
    before = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["requests"]["requests"]
    for _ in range(3):
        post(node, CHAT, {"model": "auto", "messages": [], "max_tokens": 5})
        post(node, CHAT, b"garbage")
    after = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["requests"]["requests"]
    assert after == before
    completion = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert completion.usage.completion_tokens >= 1
