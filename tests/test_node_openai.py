"""End to end: the official openai client against a real node (Ray, Serve, worker, SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest

from tests.nodes import LONG_JSON

pytestmark = pytest.mark.node

LONG_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def test_models_list_and_get(client: openai.OpenAI, model_name: str) -> None:
    ids = [model.id for model in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct"]
    card = client.models.retrieve(model_name)
    assert card.id == model_name
    extra = card.model_extra["mycellm"]
    assert extra["backend"] == "llama_cpp"
    assert extra["context_tokens"] == 2048
    assert extra["routes"][0]["kind"] == "local"


def test_chat_non_streaming(client: openai.OpenAI, node, model_name: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24, temperature=0
    )
    completion = raw.parse()
    status = httpx.get(f"{node.url}/v1/node/status").json()
    assert raw.headers["x-mycellm-routed-to"] == status["peer_id"]
    assert completion.object == "chat.completion"
    assert completion.model == model_name
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 5
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.model_extra["mycellm"]["route"] == "local"
    assert completion.model_extra["mycellm"]["served_by"] == status["peer_id"]


def test_chat_streaming_with_usage_matches_non_streaming_prompt(
    client: openai.OpenAI, model_name: str
) -> None:
    stream = client.chat.completions.create(
        model=model_name,
        messages=LONG_PROMPT,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text
    assert finishes in (["length"], ["stop"])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    usage = usage_chunks[0].usage
    if finishes == ["length"]:
        assert usage.completion_tokens == 40
    whole = client.chat.completions.create(
        model=model_name, messages=LONG_PROMPT, max_tokens=1, temperature=0
    )
    assert whole.usage.prompt_tokens == usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(
        client.chat.completions.create(model=model_name, messages=LONG_PROMPT, max_tokens=8, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_completion_tokens_and_auto_model(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model="auto", messages=LONG_PROMPT, max_completion_tokens=5, temperature=0
    )
    assert completion.model == model_name
    assert completion.usage.completion_tokens <= 5
    if completion.choices[0].finish_reason == "length":
        assert completion.usage.completion_tokens == 5


def test_stop_sequence_is_honoured(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(
        model=model_name, prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=40, temperature=0, stop=[" 9"]
    )
    choice = completion.choices[0]
    assert " 9" not in choice.text
    assert choice.finish_reason == "stop"


def test_sampling_parameters_accepted(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=10,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert completion.usage.completion_tokens >= 1


def test_json_object_response_format(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with name and age."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    content = completion.choices[0].message.content
    assert content.lstrip().startswith("{")
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_forced_tool_call(client: openai.OpenAI, model_name: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    completion = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


def test_legacy_completions_stream_and_echo(client: openai.OpenAI, model_name: str) -> None:
    echoed = client.completions.create(
        model=model_name, prompt="The sky is", max_tokens=5, echo=True, temperature=0
    )
    assert echoed.object == "text_completion"
    assert echoed.choices[0].text.startswith("The sky is")
    chunks = list(
        client.completions.create(
            model=model_name, prompt="Once upon a time", max_tokens=12, stream=True, temperature=0
        )
    )
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings_float_base64_and_tokens(client: openai.OpenAI, model_name: str) -> None:
    result = client.embeddings.create(
        model=model_name, input=["hello world", "the sea"]
    )  # client asks base64
    assert [item.index for item in result.data] == [0, 1]
    vector = result.data[0].embedding
    assert len(vector) == 576
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
    assert result.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=model_name, input="hello world", encoding_format="float")
    assert all(
        math.isclose(a, b, abs_tol=1e-5) for a, b in zip(floats.data[0].embedding, vector, strict=True)
    )
    tokens = client.embeddings.create(model=model_name, input=[[28120, 905]])
    assert tokens.usage.prompt_tokens == 2


async def test_concurrent_streams_all_complete(async_client: openai.AsyncOpenAI, model_name: str) -> None:
    async def one(index: int) -> int:
        stream = await async_client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": f"Count to {index + 3}."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return usage.completion_tokens

    counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), timeout=120)
    assert all(1 <= count <= 16 for count in counts)


COUNTING = {
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
    "max_tokens": 1500,
    "temperature": 0,
}  # runs ~10 s, no early stop


def wait_until_idle_and_cancelled(node, endpoint: str) -> None:
    for _ in range(20):
        status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
        if all(worker["active_requests"] == 0 for worker in status["workers"]):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"generation still running after the client left: {status['workers']}")
    for _ in range(40):  # the ledger is written off the response path
        records = httpx.get(f"{node.url}/v1/node/requests", params={"limit": 3}, timeout=10).json()["data"]
        if any(
            r["outcome"] == "cancelled" and r["endpoint"] == endpoint and r["completion_tokens"] < 1500
            for r in records
        ):
            return
        time.sleep(0.25)
    pytest.fail(f"the request was not recorded as cancelled: {records}")


def test_client_disconnect_cancels_streaming_generation(node, model_name: str) -> None:
    body = {
        "model": model_name,
        "stream": True,
        "messages": LONG_PROMPT,
        "max_tokens": 1500,
        "response_format": LONG_JSON,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{node.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
    wait_until_idle_and_cancelled(node, "chat")


def test_client_timeout_cancels_non_streaming_generation(node, model_name: str) -> None:
    with pytest.raises(httpx.TimeoutException):
        body = {
            "model": model_name,
            "messages": LONG_PROMPT,
            "max_tokens": 1500,
            "response_format": LONG_JSON,
        }
        httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=1.5)
    wait_until_idle_and_cancelled(node, "chat")


def test_metrics_and_status(node, client: openai.OpenAI, model_name: str) -> None:
    client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    metrics = httpx.get(f"{node.url}/metrics", timeout=10).text
    assert "mycellm_requests_total" in metrics
    assert "mycellm_time_to_first_token_seconds_bucket" in metrics
    status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
    assert len(status["peer_id"]) == 64
    assert status["requests"]["requests"] >= 1
    assert status["workers"][0]["ready"] is True
    assert httpx.get(f"{node.url}/health", timeout=10).json()["status"] == "ok"
