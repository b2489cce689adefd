"""Tests of the OpenAI-compatible upstream engine against a fake upstream served on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mycellm.config import ModelSettings
from mycellm.engines.continuation import RESUME_UNSUPPORTED
from mycellm.engines.openai_upstream import OpenAIUpstreamEngine
from mycellm.engines.protocol import InferenceEngine, collect
from mycellm.errors import EngineError, InvalidRequestError, ModelNotFoundError, UpstreamError
from mycellm.types import EmbeddingRequest, GenerationRequest
from tests.fake_upstream import (
    API_KEY,
    CHAT_PIECES,
    COMPLETION_PIECES,
    CONTEXT_TOKENS,
    MODELS,
    TOOL_ARGUMENT_PIECES,
    FakeUpstream,
    closed_port,
    running_upstream,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


def settings_for(upstream: FakeUpstream, **overrides: Any) -> ModelSettings:
    values: dict[str, Any] = {
        "backend": "openai",
        "base_url": upstream.base_url,
        "api_key": API_KEY,
        "timeout_s": 10,
    }
    return ModelSettings(**(values | overrides))


@pytest.fixture
async def engine(upstream: FakeUpstream) -> AsyncIterator[OpenAIUpstreamEngine]:
    started = OpenAIUpstreamEngine(settings_for(upstream))
    await started.start()
    yield started
    await started.close()


def chat(model: str = "alpha", **fields: Any) -> GenerationRequest:
    messages = ({"role": "user", "content": "Say hello to the nice people"},)
    return GenerationRequest(request_id="req-1", model=model, messages=messages, **fields)


async def test_discovers_the_upstream_models(engine: OpenAIUpstreamEngine) -> None:
    assert isinstance(engine, InferenceEngine)
    infos = {info.name: info for info in engine.models()}
    assert set(infos) == set(MODELS)
    assert infos["alpha"].context_tokens == CONTEXT_TOKENS  # learned from the upstream
    assert infos["beta"].context_tokens == 2048  # the settings' default
    assert all(
        info.backend == "openai" and info.supports_tools and info.supports_embeddings
        for info in infos.values()
    )


async def test_serves_only_the_configured_models(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(
        settings_for(upstream, upstream_models=("beta",), tier="fast", tags=("cheap",))
    )
    await engine.start()
    try:
        [info] = engine.models()
        assert (info.name, info.tier, info.tags) == ("beta", "fast", ("cheap",))
        with pytest.raises(ModelNotFoundError):
            await collect(engine.generate(chat("alpha")))
    finally:
        await engine.close()


async def test_a_configured_model_the_upstream_lacks_is_an_error(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(settings_for(upstream, upstream_models=("beta", "gamma")))
    with pytest.raises(EngineError, match="gamma"):
        await engine.start()


async def test_a_single_model_is_exposed_under_its_configured_name(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(settings_for(upstream, upstream_models=("beta",), name="house-model"))
    await engine.start()
    try:
        assert [info.name for info in engine.models()] == ["house-model"]
        result = await collect(engine.generate(chat("house-model")))
        assert result.text == "".join(CHAT_PIECES)
        assert upstream.requests[-1]["model"] == "beta"
    finally:
        await engine.close()


async def test_streamed_chat_yields_the_text_and_the_upstream_usage(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    request = chat(max_tokens=50, temperature=0.2, top_p=0.9, seed=7, stop=("END",), presence_penalty=0.5)
    chunks = [chunk async for chunk in engine.generate(request)]
    assert "".join(chunk.text for chunk in chunks) == "".join(CHAT_PIECES)
    assert [chunk.text for chunk in chunks[:-1]] == list(CHAT_PIECES)
    final = chunks[-1]
    assert final.finish_reason == "stop"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (6 + 3, len(CHAT_PIECES))
    sent = upstream.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"]) == (50, 0.2, 0.9, 7)
    assert sent["stop"] == ["END"] and sent["presence_penalty"] == 0.5
    assert "frequency_penalty" not in sent


async def test_collect_drains_a_stream(engine: OpenAIUpstreamEngine, upstream: FakeUpstream) -> None:
    result = await collect(engine.generate(chat(response_format={"type": "json_object"})))
    assert result.text == "".join(CHAT_PIECES)
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == len(CHAT_PIECES)
    assert upstream.requests[-1]["response_format"] == {"type": "json_object"}
    assert "stop" not in upstream.requests[-1]  # an empty stop list is not sent


async def test_tool_calls_are_assembled_from_fragments(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    result = await collect(engine.generate(chat(tools=(WEATHER_TOOL,), tool_choice="auto")))
    assert result.finish_reason == "tool_calls"
    assert result.text == ""
    first, second = result.tool_calls
    assert (first.id, first.name) == ("call_a", "weather")
    assert json.loads(first.arguments) == {"city": "Paris", "unit": "C"}
    assert (second.id, json.loads(second.arguments)) == ("call_b", {"city": "Tunis", "unit": "C"})
    assert upstream.requests[-1]["tools"] == [WEATHER_TOOL]
    assert upstream.requests[-1]["tool_choice"] == "auto"


async def test_a_tool_call_the_upstream_cut_keeps_finish_length(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake's tool calls as a token limit would cut them: the first argument pieces, "length".
    stream, ended = upstream._stream, {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}

    def cut(request: Any, body: Any, events: list[dict[str, Any]], usage: Any) -> Any:
        return stream(request, body, [*events[:5], ended], usage)

    monkeypatch.setattr(upstream, "_stream", cut)
    result = await collect(engine.generate(chat(max_tokens=2, tools=(WEATHER_TOOL,))))
    assert result.finish_reason == "length"  # and the partial calls are kept as the upstream sent them
    assert [call.arguments for call in result.tool_calls] == ['{"city"', '{"city"']


async def test_an_upstream_that_does_not_stream_still_works(engine: OpenAIUpstreamEngine) -> None:
    result = await collect(engine.generate(chat("no-stream", tools=(WEATHER_TOOL,))))
    [call] = result.tool_calls
    assert json.loads(call.arguments)["city"] == "Paris"
    assert result.usage.completion_tokens == 2 * len(TOOL_ARGUMENT_PIECES)


async def test_legacy_completion_with_echo(engine: OpenAIUpstreamEngine, upstream: FakeUpstream) -> None:
    request = GenerationRequest(
        request_id="req-2", model="alpha", prompt="One two three", echo=True, max_tokens=3
    )
    result = await collect(engine.generate(request))
    assert result.text == "One two three" + "".join(COMPLETION_PIECES)
    assert result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, len(COMPLETION_PIECES))
    assert upstream.requests[-1]["echo"] is True and upstream.requests[-1]["prompt"] == "One two three"


async def test_missing_usage_is_estimated_and_logged(
    engine: OpenAIUpstreamEngine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mycellm.engines.openai_upstream"):
        result = await collect(engine.generate(chat("no-usage")))
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens >= len(CHAT_PIECES)
    assert "estimate" in caplog.text


async def test_embeddings(engine: OpenAIUpstreamEngine) -> None:
    result = await engine.embed(
        EmbeddingRequest(request_id="req-3", model="embedder", inputs=("a b c", "hello"))
    )
    assert result.vectors == ((5.0, 0.0, 0.5), (5.0, 1.0, 0.5))
    assert result.prompt_tokens == 4


async def test_a_bad_key_is_an_upstream_error_without_the_key(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(settings_for(upstream, api_key="sk-very-secret-key"))
    with pytest.raises(UpstreamError, match="credentials") as caught:
        await engine.start()
    assert "sk-very-secret-key" not in str(caught.value)
    assert upstream.base_url in str(caught.value)


async def test_status_400_is_an_invalid_request_with_the_upstream_message(
    engine: OpenAIUpstreamEngine,
) -> None:
    with pytest.raises(InvalidRequestError, match="too hot") as caught:
        await collect(engine.generate(chat("fail-400")))
    assert caught.value.param == "temperature"


async def test_status_404_is_model_not_found(engine: OpenAIUpstreamEngine) -> None:
    with pytest.raises(ModelNotFoundError):
        await collect(engine.generate(chat("fail-404")))


@pytest.mark.parametrize("model", ["fail-500", "fail-429"])
async def test_status_429_and_500_are_upstream_errors(engine: OpenAIUpstreamEngine, model: str) -> None:
    with pytest.raises(UpstreamError, match=model.removeprefix("fail-")):
        await collect(engine.generate(chat(model)))
    with pytest.raises(UpstreamError, match=model.removeprefix("fail-")):
        await engine.embed(EmbeddingRequest(request_id="req-4", model=model, inputs=("x",)))


async def test_a_malformed_stream_is_an_upstream_error(engine: OpenAIUpstreamEngine) -> None:
    with pytest.raises(UpstreamError, match="malformed JSON"):
        await collect(engine.generate(chat("garbage")))


async def test_a_stream_cut_short_is_an_upstream_error(engine: OpenAIUpstreamEngine) -> None:
    with pytest.raises(UpstreamError, match="before the generation finished"):
        await collect(engine.generate(chat("truncated")))


async def test_an_error_event_mid_stream_is_an_upstream_error(engine: OpenAIUpstreamEngine) -> None:
    stream = engine.generate(chat("mid-error"))
    assert (await anext(stream)).text == CHAT_PIECES[0]
    with pytest.raises(UpstreamError, match="overloaded"):
        await anext(stream)


async def test_a_silent_upstream_times_out(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(settings_for(upstream, timeout_s=0.5))
    await engine.start()
    try:
        async with asyncio.timeout(5):
            with pytest.raises(UpstreamError, match="timed out"):
                await collect(engine.generate(chat("hang")))
    finally:
        await engine.close()


async def test_an_unreachable_upstream_fails_quickly() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    engine = OpenAIUpstreamEngine(ModelSettings(backend="openai", base_url=base_url, api_key="sk-hidden"))
    started = time.monotonic()
    async with asyncio.timeout(5):
        with pytest.raises(UpstreamError, match="cannot reach") as caught:
            await engine.start()
    assert time.monotonic() - started < 5
    assert base_url in str(caught.value) and "sk-hidden" not in str(caught.value)


async def test_closing_the_stream_early_disconnects_from_the_upstream(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    upstream.disconnected.clear()
    before = upstream.disconnects
    stream = engine.generate(chat("slow"))
    async with asyncio.timeout(5):
        first = await anext(stream)
        assert first.text == CHAT_PIECES[0]
        await stream.aclose()  # type: ignore[attr-defined]
    # Wait while blocking this event loop: the upstream (its own thread) must see the disconnect
    # because aclose() closed the response, not because garbage collection got to it later. The
    # fake's stream would otherwise run for about 10 s more.
    assert upstream.disconnected.wait(5)
    assert upstream.disconnects == before + 1


async def test_generation_before_start_is_an_engine_error(upstream: FakeUpstream) -> None:
    engine = OpenAIUpstreamEngine(settings_for(upstream))
    with pytest.raises(EngineError, match="not started"):
        await collect(engine.generate(chat()))


# -- resuming a generation from its continuation ------------------------------------------------


def completion(**fields: Any) -> GenerationRequest:
    return GenerationRequest(request_id="req-5", model="alpha", prompt="One two three", **fields)


async def test_a_resumed_completion_sends_the_continuation_as_prompt(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    continuation = " four five six"  # 14 characters: 3 tokens by the quarter-token estimate
    result = await collect(engine.generate(completion(max_tokens=10, echo=True, continuation=continuation)))
    sent = upstream.requests[-1]
    assert sent["prompt"] == "One two three four five six"
    assert sent["max_tokens"] == 10 - 3
    assert sent["echo"] is False  # the earlier attempt sent the prompt
    assert result.text == "".join(COMPLETION_PIECES)
    # The upstream's prompt count as it is (it includes the continuation); the continuation's
    # estimate added to the new tokens.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (6, len(COMPLETION_PIECES) + 3)


async def test_a_resumed_chat_continues_a_final_assistant_message(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    continuation = "Hi there, "  # 10 characters: 2 tokens
    result = await collect(engine.generate(chat(max_tokens=50, continuation=continuation)))
    sent = upstream.requests[-1]
    assert sent["messages"][-1] == {"role": "assistant", "content": continuation}
    assert sent["messages"][:-1] == list(chat().messages or ())
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == 48
    assert result.text == "".join(CHAT_PIECES)
    assert result.usage.completion_tokens == len(CHAT_PIECES) + 2


async def test_a_continuation_that_fills_max_tokens_ends_without_asking_the_upstream(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    result = await collect(engine.generate(completion(max_tokens=3, continuation="x" * 12)))
    assert (result.text, result.finish_reason) == ("", "length")
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens > 0  # estimated: the upstream was not asked
    assert len(upstream.requests) == before


async def test_a_stop_string_across_the_seam_stops_a_resumed_generation(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    # The fake answers " and so on"; "four and" starts in the continuation.
    stopped = await collect(engine.generate(completion(continuation=" four", stop=("four and",))))
    assert (stopped.text, stopped.finish_reason) == ("", "stop")
    assert upstream.requests[-1]["stop"] == ["four and"]
    # "four or" holds back the continuation's "four" until it cannot match: it is not sent again.
    held = await collect(engine.generate(completion(continuation=" four", stop=("four or",))))
    assert held.text == "".join(COMPLETION_PIECES)
    # The same for a chat, and for an upstream that ignores stream=true.
    for model in ("alpha", "no-stream"):
        stopped = await collect(engine.generate(chat(model, continuation="Oh!", stop=("!Hello",))))
        assert (stopped.text, stopped.finish_reason) == ("", "stop")
        assert stopped.usage.completion_tokens >= 1


async def test_a_constrained_generation_cannot_be_resumed(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    constrained = (
        chat(continuation="{", response_format={"type": "json_object"}),
        chat(continuation="{", tools=(WEATHER_TOOL,), tool_choice="required"),
        chat(
            continuation="{",
            tools=(WEATHER_TOOL,),
            tool_choice={"type": "function", "function": {"name": "weather"}},
        ),
    )
    for request in constrained:
        with pytest.raises(EngineError, match="cannot resume a constrained generation") as caught:
            await collect(engine.generate(request))
        assert caught.value.code == RESUME_UNSUPPORTED
    assert len(upstream.requests) == before


async def test_an_upstream_that_rejects_the_resume_is_an_engine_error(engine: OpenAIUpstreamEngine) -> None:
    # OpenAI itself answers 400 to the fields that ask to continue the final message.
    with pytest.raises(EngineError, match="upstream cannot resume a chat generation") as caught:
        await collect(engine.generate(chat("fail-400", continuation="Hi")))
    assert not isinstance(caught.value, InvalidRequestError)
    assert caught.value.code == RESUME_UNSUPPORTED


async def test_a_stop_found_across_the_seam_disconnects_from_the_upstream(
    engine: OpenAIUpstreamEngine, upstream: FakeUpstream
) -> None:
    upstream.disconnected.clear()
    before = upstream.disconnects
    async with asyncio.timeout(5):
        result = await collect(engine.generate(chat("slow", continuation="Oh!", stop=("!Hello",))))
    assert (result.text, result.finish_reason) == ("", "stop")
    # collect() leaves the generator open after the last chunk: the response was closed before it.
    assert upstream.disconnected.wait(5)
    assert upstream.disconnects == before + 1
