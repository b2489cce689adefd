"""The llama.cpp engine on the bundled SmolLM2, without Ray: usage, stops, limits, cancel, grammar."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import pytest

from mycellm.config import ModelSettings
from mycellm.engines.continuation import RESUME_UNSUPPORTED
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.engines.model_files import resolve_model_path
from mycellm.engines.protocol import collect
from mycellm.errors import ContextLengthError, EngineError, InvalidRequestError, UnsupportedParameterError
from mycellm.types import EmbeddingRequest, GenerationRequest


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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_a_tool_call_cut_by_max_tokens_finishes_with_length(engine: LlamaCppEngine) -> None:
    request = chat(
        "What is the weather in Cumbria?",
        max_tokens=6,
        temperature=0,
        tools=(WEATHER_TOOL,),
        tool_choice="required",
    )
    chunks = [chunk async for chunk in engine.generate(request)]
    streamed = chunks[-1]
    assert streamed.finish_reason == "length" and streamed.usage is not None
    assert streamed.usage.completion_tokens == 6
    whole = await collect(engine.generate(request))
    assert whole.finish_reason == "length" and whole.usage.completion_tokens == 6
    # Both keep the partial call, as OpenAI does; its arguments are cut, so not valid JSON.
    for calls in ([call for chunk in chunks for call in chunk.tool_calls], whole.tool_calls):
        [call] = calls
        assert call.name == "weather" and call.arguments.startswith("{")
        with pytest.raises(ValueError):
            json.loads(call.arguments)


EMOJI = "Emoji: 😀😃😄😁😆😅😂🤣"


def ends_inside_a_character(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"
    return False


async def test_a_cut_inside_a_character_drops_it_instead_of_replacing_it(engine: LlamaCppEngine) -> None:
    llama = engine._llama
    assert llama is not None
    prompt = llama.tokenize(EMOJI.encode(), add_bos=llama._model.add_bos_token(), special=True)

    def greedy_pieces() -> list[bytes]:
        tokens = itertools.islice(llama.generate(prompt, temp=0, repeat_penalty=1.0), 6)
        return [llama.detokenize([token]) for token in tokens]

    # The model's own tokens at temperature 0, in the Llama's own context (the engine's scheduler
    # decodes in a batched context of its own, so this thread shares no context with it).
    pieces = await asyncio.to_thread(greedy_pieces)
    cuts = [size for size in range(1, 7) if ends_inside_a_character(b"".join(pieces[:size]))]
    assert cuts, f"no budget from 1 to 6 ends inside a character: {pieces}"
    for max_tokens in range(1, 7):
        request = GenerationRequest(
            request_id="r", model="m", prompt=EMOJI, max_tokens=max_tokens, temperature=0, seed=1
        )
        chunks = [chunk async for chunk in engine.generate(request)]
        text = "".join(chunk.text for chunk in chunks)
        assert "\ufffd" not in text, (max_tokens, text)
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == max_tokens  # the dropped bytes' tokens count


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


# -- resuming a generation from its continuation ------------------------------------------------

MOON = "Tell me about the moon."
COUNTING = "1, 2, 3, 4, 5, 6,"


def counting(**options: object) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="m", prompt=COUNTING, temperature=0, seed=1, **options)


def continuation_tokens(engine: LlamaCppEngine, prompt: str, continuation: str) -> int:
    """The continuation's tokens by the rule the engines follow: prompt and continuation tokenized together."""
    llama = engine._llama
    assert llama is not None
    whole = llama.tokenize((prompt + continuation).encode(), add_bos=False, special=True)
    alone = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    return max(0, len(whole) - len(alone))


async def test_a_resumed_chat_streams_only_new_text_with_the_whole_usage(engine: LlamaCppEngine) -> None:
    plain_chunks = [
        chunk async for chunk in engine.generate(chat(MOON, max_tokens=24, temperature=0, seed=1))
    ]
    plain = plain_chunks[-1]
    assert plain.finish_reason == "length" and plain.usage is not None
    assert plain.usage.completion_tokens == 24
    continuation = "".join(chunk.text for chunk in plain_chunks[:8])
    assert engine._formatter is not None
    prompt = engine._formatter(messages=[{"role": "user", "content": MOON}]).prompt
    # The model's own text tokenizes back to the tokens it came from, 8 of them.
    assert continuation_tokens(engine, prompt, continuation) == 8

    chunks = [
        chunk
        async for chunk in engine.generate(
            chat(MOON, max_tokens=24, temperature=0, seed=1, continuation=continuation)
        )
    ]
    final = chunks[-1]
    assert final.usage is not None and final.finish_reason == "length"
    assert final.usage.prompt_tokens == plain.usage.prompt_tokens
    # 8 tokens of continuation and 16 new ones: the whole answer as one generation.
    assert final.usage.completion_tokens == 24
    text = "".join(chunk.text for chunk in chunks)
    assert text and not text.startswith(continuation.strip())
    llama = engine._llama
    assert llama is not None
    new_tokens = len(llama.tokenize(text.encode(), add_bos=False, special=False))
    assert abs(new_tokens - 16) <= 2  # the continuation was not sent again


async def test_a_continuation_that_fills_max_tokens_ends_at_once(engine: LlamaCppEngine) -> None:
    plain = await collect(engine.generate(chat(MOON, max_tokens=12, temperature=0, seed=1)))
    assert plain.finish_reason == "length"
    for max_tokens in (12, 5):
        result = await collect(
            engine.generate(chat(MOON, max_tokens=max_tokens, temperature=0, continuation=plain.text))
        )
        assert (result.text, result.finish_reason) == ("", "length")
        assert result.usage.prompt_tokens == plain.usage.prompt_tokens
        # The continuation counts whole, even where it is longer than max_tokens.
        assert result.usage.completion_tokens == plain.usage.completion_tokens


async def test_a_resumed_completion_counts_the_continuation(engine: LlamaCppEngine) -> None:
    plain = await collect(engine.generate(counting(max_tokens=12)))
    resumed = await collect(engine.generate(counting(max_tokens=12, continuation=" 7, 8", echo=True)))
    assert resumed.usage.prompt_tokens == plain.usage.prompt_tokens
    added = continuation_tokens(engine, COUNTING, " 7, 8")
    assert added == 5  # digits, commas and spaces are tokens of their own
    assert resumed.finish_reason == "length"
    assert resumed.usage.completion_tokens == 12
    # A resumed request does not echo the prompt again (the earlier attempt sent it).
    assert not resumed.text.startswith(COUNTING)
    assert resumed.text.startswith(", 9")  # the count goes on after the continuation


async def test_a_stop_string_across_the_seam_stops(engine: LlamaCppEngine) -> None:
    resumed = await collect(engine.generate(counting(max_tokens=12, continuation=" 7, 8")))
    assert resumed.text.startswith(", 9")
    # " 8, 9" starts in the continuation and ends in the new text.
    stopped = await collect(engine.generate(counting(max_tokens=12, continuation=" 7, 8", stop=(" 8, 9",))))
    assert (stopped.text, stopped.finish_reason) == ("", "stop")
    assert 5 < stopped.usage.completion_tokens < 12
    # " 8, 7" holds back the continuation's " 8" until it cannot match: that text is not sent again.
    held = await collect(engine.generate(counting(max_tokens=12, continuation=" 7, 8", stop=(" 8, 7",))))
    assert held.text == resumed.text
    assert held.finish_reason == "length"


async def test_a_constrained_generation_cannot_be_resumed(engine: LlamaCppEngine) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    constrained = (
        chat("x", continuation="{", response_format={"type": "json_object"}),
        chat("x", continuation="{", tools=(tool,), tool_choice="required"),
    )
    for request in constrained:
        with pytest.raises(EngineError, match="cannot resume a constrained generation") as caught:
            await collect(engine.generate(request))
        assert caught.value.code == RESUME_UNSUPPORTED
    # Plain text output is not constrained.
    result = await collect(
        engine.generate(chat("x", max_tokens=2, continuation="Hi", response_format={"type": "text"}))
    )
    assert result.usage.completion_tokens >= 1


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "object", "properties": {"a": 5}}])
async def test_a_schema_the_converter_cannot_read_is_a_bad_request(
    engine: LlamaCppEngine, schema: dict[str, object]
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(InvalidRequestError, match="cannot be turned into a grammar"):
        await collect(engine.generate(chat("Answer.", max_tokens=4, response_format=response_format)))


async def test_embedding_special_tokens_only_is_a_bad_request(engine: LlamaCppEngine) -> None:
    llama = engine._llama
    assert llama is not None
    assert llama.detokenize([0]) == b""  # the end-of-text token: no text at all
    with pytest.raises(InvalidRequestError, match="no text"):
        await engine.embed(EmbeddingRequest(request_id="e", model="m", inputs=((0,),)))
