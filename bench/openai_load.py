"""Shared load driver for benchmarks: timed OpenAI requests (stream and not) at a given concurrency."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import openai


@dataclass(frozen=True)
class Sample:
    time_to_first_token_s: float | None  # None for non-streaming requests
    total_s: float
    completion_tokens: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.time_to_first_token_s is None or self.completion_tokens < 2:
            return None
        decode = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode if decode > 0 else None


@dataclass(frozen=True)
class ScenarioResult:
    samples: list[Sample]
    wall_s: float

    @property
    def median_ttft_ms(self) -> float | None:
        values = [s.time_to_first_token_s for s in self.samples if s.time_to_first_token_s is not None]
        return statistics.median(values) * 1000 if values else None

    @property
    def median_decode_tokens_per_s(self) -> float | None:
        values = [v for s in self.samples if (v := s.decode_tokens_per_s) is not None]
        return statistics.median(values) if values else None

    @property
    def aggregate_tokens_per_s(self) -> float:
        return sum(s.completion_tokens for s in self.samples) / self.wall_s

    @property
    def median_latency_ms(self) -> float:
        return statistics.median(s.total_s for s in self.samples) * 1000


async def timed_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, stream: bool
) -> Sample:
    messages = [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    if not stream:
        completion = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,  # type: ignore[arg-type]
        )
        assert completion.usage is not None
        return Sample(None, time.perf_counter() - started, completion.usage.completion_tokens)
    first: float | None = None
    tokens = 0
    content_chunks = 0  # llama_cpp.server sends no usage in streams; it sends one chunk per token
    response = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    async for chunk in response:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            content_chunks += 1
            if first is None:
                first = time.perf_counter() - started
    return Sample(first, time.perf_counter() - started, tokens or content_chunks)


async def run_scenario(
    base_url: str, model: str, prompts: list[str], *, concurrency: int, stream: bool, max_tokens: int
) -> ScenarioResult:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=300)
    queue = list(prompts)
    samples: list[Sample] = []

    async def runner() -> None:
        while queue:
            prompt = queue.pop()
            samples.append(await timed_request(client, model, prompt, max_tokens, stream))

    started = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return ScenarioResult(samples, wall)
