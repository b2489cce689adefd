"""The llama.cpp engine on the bundled SmolLM2, without Ray: usage, stops, limits, cancel, grammar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from mycellm.config import ModelSettings
from mycellm.engines.base import EmbeddingRequest, GenerationRequest, collect
from mycellm.engines.llama_cpp import LlamaCppEngine, resolve_model_path
from mycellm.errors import ContextLengthError, EngineError, InvalidRequestError, UnsupportedParameterError


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2))
    asyncio.run(engine.start())
    return engine


def chat(text: str, **options: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", model="m", messages=({"role": "user", "content": text},), **options
    )


async def test_usage_is_exact(engine: LlamaCppEngine) -> None:
    result = await collect(engine.generate(chat("Tell me about the moon.", max_tokens=12, temperature=0)))
    llama = engine._llama
    assert llama is not None
    assert engine._formatter is not None
    prompt = engine._formatter(messages=[{"role": "user", "content": "Tell me about the moon."}]).prompt
    assert result.usage.prompt_tokens == len(llama.tokenize(prompt.encode(), add_bos=False, special=True))
    assert result.usage.completion_tokens == 12
    assert result.finish_reason == "length"
    retokenized = llama.tokenize(result.text.encode(), add_bos=False, special=False)
    assert abs(len(retokenized) - 12) <= 2  # detokenize/retokenize may merge a piece or two


async def test_stop_string_cuts_output(engine: LlamaCppEngine) -> None:
    request = GenerationRequest(
        request_id="r", model="m", prompt="1, 2, 3, 4, 5, 6,", max_tokens=30, temperature=0, stop=(" 9",)
    )
    result = await collect(engine.generate(request))
    assert " 9" not in result.text
    assert " 7" in result.text
    assert result.finish_reason == "stop"


async def test_context_overflow_is_refused(engine: LlamaCppEngine) -> None:
    with pytest.raises(ContextLengthError, match="512"):
        await collect(engine.generate(chat("word " * 600)))


async def test_max_tokens_clamped_to_context_room(engine: LlamaCppEngine) -> None:
    result = await collect(engine.generate(chat("word " * 480, max_tokens=400, temperature=0)))
    assert result.usage.prompt_tokens + result.usage.completion_tokens <= 512


async def test_closing_early_frees_the_engine(engine: LlamaCppEngine) -> None:
    stream: AsyncIterator = engine.generate(chat("Write a very long story.", max_tokens=400))
    first = await anext(stream)
    assert first.text
    await stream.aclose()  # type: ignore[attr-defined]
    result = await asyncio.wait_for(collect(engine.generate(chat("Hi", max_tokens=4))), timeout=30)
    assert result.usage.completion_tokens <= 4


async def test_json_object_and_schema(engine: LlamaCppEngine) -> None:
    result = await collect(
        engine.generate(
            chat(
                "A JSON object about a dog.",
                max_tokens=120,
                temperature=0,
                response_format={"type": "json_object"},
            )
        )
    )
    assert result.text.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    result = await collect(
        engine.generate(
            chat(
                "How old is the dog?",
                max_tokens=40,
                temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            )
        )
    )
    assert isinstance(json.loads(result.text)["age"], int)


async def test_forced_tool_and_errors(engine: LlamaCppEngine) -> None:
    tools = (
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            },
        },
    )
    result = await collect(
        engine.generate(
            chat("Look up cats", max_tokens=40, temperature=0, tools=tools, tool_choice="required")
        )
    )
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls[0].name == "lookup"
    assert "q" in json.loads(result.tool_calls[0].arguments)
    with pytest.raises(InvalidRequestError):
        await collect(
            engine.generate(
                chat("x", tools=tools, tool_choice={"type": "function", "function": {"name": "other"}})
            )
        )
    with pytest.raises(InvalidRequestError):
        await collect(
            engine.generate(
                chat("x", response_format={"type": "json_schema", "json_schema": {"schema": "no"}})
            )
        )


async def test_embeddings_are_normalised_and_counted(engine: LlamaCppEngine) -> None:
    result = await engine.embed(EmbeddingRequest(request_id="e", model="m", inputs=("hello world", "a cat")))
    assert len(result.vectors) == 2
    for vector in result.vectors:
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-3
    assert result.vectors[0] != result.vectors[1]
    assert result.prompt_tokens >= 4
    with pytest.raises(InvalidRequestError):
        await engine.embed(EmbeddingRequest(request_id="e", model="m", inputs=((10**9,),)))
    with pytest.raises(ContextLengthError):
        await engine.embed(EmbeddingRequest(request_id="e", model="m", inputs=("word " * 700,)))


async def test_embeddings_can_be_switched_off() -> None:
    engine = LlamaCppEngine(ModelSettings(embeddings=False, context_tokens=256))
    await engine.start()
    try:
        with pytest.raises(UnsupportedParameterError):
            await engine.embed(EmbeddingRequest(request_id="e", model="m", inputs=("x",)))
    finally:
        await engine.close()


def test_missing_model_file_is_an_engine_error(tmp_path) -> None:
    with pytest.raises(EngineError, match="not found"):
        resolve_model_path(str(tmp_path / "absent.gguf"))
    assert resolve_model_path("smollm2").name.endswith(".gguf")


async def test_generation_before_start_fails() -> None:
    engine = LlamaCppEngine(ModelSettings())
    with pytest.raises(EngineError, match="not loaded"):
        await collect(engine.generate(chat("x")))
