"""Tests for ChunkBuffer: merging pending chunks, timeouts, the final chunk, errors and pacing."""

from __future__ import annotations

import asyncio
import time

import pytest

from mycellm.engines.streams import ChunkBuffer, StreamTable, merge_chunks
from mycellm.errors import EngineError
from mycellm.types import GenerationChunk, RequestId, ToolCall, Usage

USAGE = Usage(prompt_tokens=5, completion_tokens=3)


def final(text: str = "", reason: str = "stop") -> GenerationChunk:
    return GenerationChunk(text=text, finish_reason=reason, usage=USAGE)  # type: ignore[arg-type]


async def test_take_merges_pending_text() -> None:
    buffer = ChunkBuffer()
    for piece in ("Hel", "lo", ", ", "world"):
        buffer.put(GenerationChunk(text=piece))
    chunk = await buffer.take(1.0)
    assert chunk is not None
    assert chunk.text == "Hello, world"
    assert chunk.finish_reason is None
    assert not buffer.finished


async def test_take_delivers_each_piece_once() -> None:
    buffer = ChunkBuffer()
    buffer.put(GenerationChunk(text="one"))
    first = await buffer.take(1.0)
    buffer.put(GenerationChunk(text="two"))
    second = await buffer.take(1.0)
    assert first is not None and first.text == "one"
    assert second is not None and second.text == "two"


async def test_take_returns_none_after_wait_with_nothing() -> None:
    buffer = ChunkBuffer()
    started = time.monotonic()
    assert await buffer.take(0.05) is None
    assert time.monotonic() - started >= 0.04
    assert not buffer.finished


async def test_take_wakes_when_a_chunk_arrives() -> None:
    buffer = ChunkBuffer()
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, buffer.put, GenerationChunk(text="late"))
    started = time.monotonic()
    chunk = await buffer.take(5.0)
    assert chunk is not None and chunk.text == "late"
    assert time.monotonic() - started < 2.0


async def test_final_chunk_carries_finish_reason_and_usage() -> None:
    buffer = ChunkBuffer()
    buffer.put(GenerationChunk(text="a"))
    buffer.put(final("b", "length"))
    assert not buffer.finished
    chunk = await buffer.take(1.0)
    assert chunk is not None
    assert chunk.text == "ab"
    assert chunk.finish_reason == "length"
    assert chunk.usage == USAGE
    assert buffer.finished


async def test_error_after_text_is_raised_after_the_text_is_delivered() -> None:
    buffer = ChunkBuffer()
    buffer.put(GenerationChunk(text="partial "))
    buffer.put(GenerationChunk(text="answer"))
    buffer.fail(EngineError("engine crashed"))
    chunk = await buffer.take(1.0)
    assert chunk is not None
    assert chunk.text == "partial answer"
    # The error is still owed to the reader, so the stream is not finished yet.
    assert not buffer.finished
    with pytest.raises(EngineError, match="engine crashed"):
        await buffer.take(1.0)
    assert buffer.finished


async def test_error_without_text_is_raised_at_once() -> None:
    buffer = ChunkBuffer()
    buffer.fail(EngineError("no model"))
    with pytest.raises(EngineError, match="no model"):
        await buffer.take(1.0)


async def test_error_after_tool_calls_is_raised_after_they_are_delivered() -> None:
    buffer = ChunkBuffer()
    call = ToolCall(id="call_1", name="lookup", arguments="{}")
    buffer.put(GenerationChunk(tool_calls=(call,)))
    buffer.fail(EngineError("engine crashed"))
    chunk = await buffer.take(1.0)
    assert chunk is not None and chunk.tool_calls == (call,)
    assert not buffer.finished
    with pytest.raises(EngineError):
        await buffer.take(1.0)


async def test_min_interval_delays_a_non_final_delivery() -> None:
    interval_s = 0.3
    buffer = ChunkBuffer(min_interval_s=interval_s)
    buffer.put(GenerationChunk(text="first"))
    started = time.monotonic()
    first = await buffer.take(1.0)
    assert first is not None and first.text == "first"
    assert time.monotonic() - started < interval_s  # nothing was delivered before: no pause
    buffer.put(GenerationChunk(text="second"))
    started = time.monotonic()
    second = await buffer.take(1.0)
    elapsed = time.monotonic() - started
    assert second is not None and second.text == "second"
    assert elapsed >= interval_s * 0.8


async def test_min_interval_gathers_pieces_that_arrive_during_the_pause() -> None:
    buffer = ChunkBuffer(min_interval_s=0.3)
    buffer.put(GenerationChunk(text="a"))
    await buffer.take(1.0)
    buffer.put(GenerationChunk(text="b"))
    asyncio.get_running_loop().call_later(0.05, buffer.put, GenerationChunk(text="c"))
    chunk = await buffer.take(1.0)
    assert chunk is not None and chunk.text == "bc"


async def test_min_interval_does_not_delay_the_final_delivery() -> None:
    interval_s = 2.0
    buffer = ChunkBuffer(min_interval_s=interval_s)
    buffer.put(GenerationChunk(text="first"))
    await buffer.take(1.0)
    buffer.put(final("last"))
    started = time.monotonic()
    chunk = await buffer.take(1.0)
    assert time.monotonic() - started < interval_s / 2
    assert chunk is not None and chunk.text == "last" and chunk.finish_reason == "stop"


async def test_min_interval_does_not_delay_an_error() -> None:
    interval_s = 2.0
    buffer = ChunkBuffer(min_interval_s=interval_s)
    buffer.put(GenerationChunk(text="first"))
    await buffer.take(1.0)
    buffer.fail(EngineError("boom"))
    started = time.monotonic()
    with pytest.raises(EngineError):
        await buffer.take(1.0)
    assert time.monotonic() - started < interval_s / 2


async def test_tool_calls_are_merged() -> None:
    buffer = ChunkBuffer()
    first = ToolCall(id="call_1", name="weather", arguments='{"city": "Oslo"}')
    second = ToolCall(id="call_2", name="time", arguments="{}")
    buffer.put(GenerationChunk(tool_calls=(first,)))
    buffer.put(GenerationChunk(text="", tool_calls=(second,)))
    buffer.put(GenerationChunk(finish_reason="tool_calls", usage=USAGE))
    chunk = await buffer.take(1.0)
    assert chunk is not None
    assert chunk.tool_calls == (first, second)
    assert chunk.finish_reason == "tool_calls"
    assert chunk.text == ""
    assert buffer.finished


def test_merged_chunks_keep_order_and_the_end_of_the_last() -> None:
    call = ToolCall(id="c1", name="f", arguments="{}")
    merged = merge_chunks([GenerationChunk(text="a"), GenerationChunk(tool_calls=(call,)), final("b")])
    assert merged == GenerationChunk(text="ab", tool_calls=(call,), finish_reason="stop", usage=USAGE)
    assert merge_chunks([GenerationChunk(text="x"), GenerationChunk(text="y")]).is_final is False


async def test_follow_yields_every_delivery_to_the_final_and_raises_a_failure() -> None:
    table = StreamTable()

    async def produce(buffer: ChunkBuffer) -> None:
        for text in ("a", "b"):
            buffer.put(GenerationChunk(text=text))
            await asyncio.sleep(0.02)
        buffer.put(final("c"))

    table.start(RequestId("ok"), produce)
    texts = [chunk.text async for chunk in table.follow(RequestId("ok"))]
    assert "".join(texts) == "abc" and "ok" not in table

    async def fail(buffer: ChunkBuffer) -> None:
        buffer.put(GenerationChunk(text="a"))
        raise EngineError("engine gone")

    table.start(RequestId("bad"), fail)
    seen = []
    with pytest.raises(EngineError, match="engine gone"):
        async for chunk in table.follow(RequestId("bad")):
            seen.append(chunk.text)
    assert seen == ["a"] and "bad" not in table
