"""Continuous batching in the llama.cpp engine on the bundled SmolLM2, without Ray: exact, concurrent, fair, reusing prefixes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from mycellm.config import ModelSettings
from mycellm.engines.llama_cpp import LlamaCppEngine, default_parallel
from mycellm.engines.protocol import collect
from mycellm.errors import ContextLengthError, EngineError
from mycellm.types import CompletionResult, GenerationChunk, GenerationRequest

PROMPTS = (
    "Tell me about the moon.",
    "What is a good name for a cat?",
    "Explain how rain forms.",
    "Write a haiku about bread.",
)
COUNTING = "1, 2, 3, 4, 5, 6,"


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(context_tokens=512, threads=2, parallel=4))
    asyncio.run(engine.start())
    return engine


def chat(text: str, **options: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", model="m", messages=({"role": "user", "content": text},), **options
    )


def counting(max_tokens: int) -> GenerationRequest:
    """A completion that goes on counting up to its budget (it never ends by itself)."""
    return GenerationRequest(request_id="c", model="m", prompt=COUNTING, temperature=0, max_tokens=max_tokens)


async def timed(chunks: AsyncIterator[GenerationChunk]) -> tuple[float, float, CompletionResult]:
    """When the first chunk came, when the last did, and the whole answer."""
    texts: list[str] = []
    first = 0.0
    async for chunk in chunks:
        first = first or time.monotonic()
        texts.append(chunk.text)
        if chunk.is_final:
            assert chunk.usage is not None and chunk.finish_reason is not None
            result = CompletionResult(
                text="".join(texts), finish_reason=chunk.finish_reason, usage=chunk.usage
            )
            return first, time.monotonic(), result
    raise AssertionError("the stream ended without a final chunk")


def idle_cpu_s(seconds: float = 1.0) -> float:
    started = time.process_time()
    time.sleep(seconds)
    return time.process_time() - started


def test_an_unset_parallel_depends_on_the_window_only() -> None:
    assert [default_parallel(size) for size in (512, 2048, 4096, 8192, 32768)] == [4, 4, 2, 1, 1]
    assert LlamaCppEngine(ModelSettings(context_tokens=4096)).parallel == 2
    assert LlamaCppEngine(ModelSettings(context_tokens=4096, parallel=8)).parallel == 8


async def test_concurrent_greedy_streams_give_the_text_of_lone_ones(engine: LlamaCppEngine) -> None:
    requests = [chat(text, max_tokens=48, temperature=0) for text in PROMPTS]
    alone = [await collect(engine.generate(request)) for request in requests]
    together = await asyncio.gather(*(collect(engine.generate(request)) for request in requests))
    for lone, batched in zip(alone, together, strict=True):
        assert batched.text == lone.text
        assert batched.usage == lone.usage and batched.finish_reason == lone.finish_reason
    assert len({result.text for result in alone}) == 4


async def test_four_streams_run_at_once(engine: LlamaCppEngine) -> None:
    times = await asyncio.gather(
        *(timed(engine.generate(chat(text, max_tokens=64, temperature=0))) for text in PROMPTS)
    )
    firsts, lasts = [first for first, _, _ in times], [last for _, last, _ in times]
    # Every stream had its first text before any of them finished: they were decoded together.
    assert max(firsts) < min(lasts), (firsts, lasts)


async def test_every_request_gets_a_whole_window(engine: LlamaCppEngine) -> None:
    # Four prompts of about 450 tokens each: 4 x 512 cells, more than one window holds.
    requests = [chat(f"{index} " + "word " * 440, max_tokens=40, temperature=0) for index in range(4)]
    results = await asyncio.gather(*(collect(engine.generate(request)) for request in requests))
    for result in results:
        assert result.usage.prompt_tokens > 440
        assert result.usage.prompt_tokens + result.usage.completion_tokens <= 512


async def test_more_requests_than_slots_all_complete(engine: LlamaCppEngine) -> None:
    requests = [chat(PROMPTS[index % 4], max_tokens=6 + index, temperature=0) for index in range(10)]
    results = await asyncio.gather(*(collect(engine.generate(request)) for request in requests))
    for index, result in enumerate(results):
        assert result.finish_reason in ("length", "stop")
        assert 1 <= result.usage.completion_tokens <= 6 + index


async def test_a_cancelled_stream_frees_its_slot_for_a_waiting_request(engine: LlamaCppEngine) -> None:
    streams = [engine.generate(counting(400)) for _ in range(4)]
    for stream in streams:
        assert (await anext(stream)).text
    # A request that gives up while waiting never takes a slot: it would count to 400 before the fifth.
    gave_up = asyncio.create_task(collect(engine.generate(counting(400))))
    fifth = asyncio.create_task(timed(engine.generate(chat("Hi", max_tokens=4, temperature=0))))
    await asyncio.sleep(1.0)
    assert not fifth.done() and not gave_up.done()  # all four slots are busy counting
    gave_up.cancel()
    await streams[0].aclose()  # type: ignore[attr-defined]
    _, _, result = await asyncio.wait_for(fifth, timeout=60)
    assert result.usage.completion_tokens <= 4
    for stream in streams[1:]:
        # The others were still counting when the fifth one was served.
        assert not (await anext(stream)).is_final
        await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)  # the scheduler drops them at its next step
    assert idle_cpu_s() < 0.05  # nothing is decoded for the cancelled streams


async def test_seeded_sampling_is_the_same_alone_and_among_others(engine: LlamaCppEngine) -> None:
    request = chat("Tell me a story about a cat.", max_tokens=32, temperature=0.8, seed=7)
    alone = await collect(engine.generate(request))
    again = await collect(engine.generate(request))
    others = (chat(text, max_tokens=32, temperature=0.8) for text in PROMPTS[:3])
    together = await asyncio.gather(
        collect(engine.generate(request)), *(collect(engine.generate(o)) for o in others)
    )
    assert again.text == alone.text
    assert together[0].text == alone.text


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_stops_grammars_and_tool_calls_hold_next_to_other_streams(engine: LlamaCppEngine) -> None:
    stop = GenerationRequest(
        request_id="r", model="m", prompt=COUNTING, max_tokens=30, temperature=0, stop=(" 9",)
    )
    json_object = chat(
        "A JSON object about a dog.", max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    tool = chat(
        "What is the weather in Paris?",
        max_tokens=40,
        temperature=0,
        tools=(WEATHER_TOOL,),
        tool_choice="required",
    )
    alone = [await collect(engine.generate(request)) for request in (stop, json_object, tool)]
    background = [collect(engine.generate(chat(text, max_tokens=48))) for text in PROMPTS[:2]]
    *together, _, _ = await asyncio.gather(
        *(collect(engine.generate(r)) for r in (stop, json_object, tool)), *background
    )
    stopped, constrained, called = together
    assert stopped.finish_reason == "stop" and " 9" not in stopped.text and " 7" in stopped.text
    assert constrained.text.lstrip().startswith("{")
    assert called.finish_reason == "tool_calls" and called.tool_calls[0].name == "weather"
    assert "city" in json.loads(called.tool_calls[0].arguments)
    for lone, batched in zip(alone, together, strict=True):
        assert (batched.text, batched.finish_reason, batched.usage) == (
            lone.text,
            lone.finish_reason,
            lone.usage,
        )
        assert [call.arguments for call in batched.tool_calls] == [call.arguments for call in lone.tool_calls]


async def test_a_shared_prefix_is_not_decoded_again(engine: LlamaCppEngine) -> None:
    system = (
        f"Session {uuid.uuid4().hex}. " + "You answer questions about the weather of cities in Europe. " * 20
    )

    def asking(question: str) -> GenerationRequest:
        messages = ({"role": "system", "content": system}, {"role": "user", "content": question})
        return GenerationRequest(request_id="r", model="m", messages=messages, max_tokens=4, temperature=0)

    texts: list[str] = []

    async def decoded(request: GenerationRequest) -> tuple[int, int]:
        before = engine.prompt_tokens_decoded
        result = await collect(engine.generate(request))
        texts.append(result.text)
        return engine.prompt_tokens_decoded - before, result.usage.prompt_tokens

    first, prompt = await decoded(asking("Is it raining in Paris?"))
    assert first > 200 and prompt >= first
    second, second_prompt = await decoded(asking("Is it sunny in Rome?"))
    assert second_prompt > 200
    assert second < 20  # only the new question and the turn's end: the system prompt was kept
    repeated, _ = await decoded(asking("Is it sunny in Rome?"))
    assert texts[2] == texts[1]  # a reused prefix does not change the answer
    assert repeated == 2  # the last two prompt tokens are decoded again (see BatchScheduler._step)


async def test_a_prompt_too_long_names_the_window_of_one_request(engine: LlamaCppEngine) -> None:
    with pytest.raises(ContextLengthError, match="maximum context length is 512 tokens"):
        await collect(engine.generate(chat("word " * 600)))


async def test_long_prompts_are_prefilled_in_chunks_while_others_decode() -> None:
    engine = LlamaCppEngine(
        ModelSettings(context_tokens=512, threads=2, parallel=2, batch_tokens=32, embeddings=False)
    )
    await engine.start()
    try:
        running = engine.generate(counting(300))
        assert (await anext(running)).text
        long = asyncio.create_task(timed(engine.generate(chat("word " * 400, max_tokens=2, temperature=0))))
        chunks = 0
        while not long.done():
            chunk = await anext(running)
            assert not chunk.is_final
            chunks += 1
        # About 420 prompt tokens in steps of 32 (less the running stream's token): the running
        # stream got a token in each of those steps.
        assert chunks >= 8
        await running.aclose()  # type: ignore[attr-defined]
        assert (await long)[2].usage.prompt_tokens > 400
    finally:
        await engine.close()


async def test_closing_the_engine_ends_running_streams_with_an_error() -> None:
    engine = LlamaCppEngine(ModelSettings(context_tokens=256, threads=2, parallel=2, embeddings=False))
    await engine.start()
    running = engine.generate(counting(200))
    assert (await anext(running)).text
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        async for _ in running:
            pass
    with pytest.raises(EngineError, match="not loaded"):
        await collect(engine.generate(counting(2)))


async def test_the_scheduler_sleeps_while_idle(engine: LlamaCppEngine) -> None:
    await collect(engine.generate(chat("Hi", max_tokens=2, temperature=0)))
    await asyncio.sleep(0.1)
    assert idle_cpu_s() < 0.05
