"""What continuous batching buys in the llama.cpp engine, without Ray: aggregate tokens/s and
time to first token of 1, 4 and 8 concurrent temperature-0 streams of 96 tokens each.

The same engine is measured with ``parallel: 1`` (one request at a time, as the engine served
before batching) and with ``parallel: 4`` (the default for the bundled model), in one run, and the
ratio printed. Each stream is a different chat prompt; every stream must produce its 96 tokens.

    .venv/bin/python bench/engine_batching.py [--threads 2] [--tokens 96] [--clients 1 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from mycellm.config import ModelSettings
from mycellm.engines.llama_cpp import LlamaCppEngine
from mycellm.types import GenerationRequest

TOPICS = ("the moon", "cats", "rain", "bread", "trains", "the sea", "music", "winter", "bees", "maps")


def request(index: int, tokens: int) -> GenerationRequest:
    topic = TOPICS[index % len(TOPICS)]
    messages = ({"role": "user", "content": f"Write a long essay about {topic}, part {index}."},)
    return GenerationRequest(
        request_id=f"b{index}", model="m", messages=messages, max_tokens=tokens, temperature=0
    )


async def stream(engine: LlamaCppEngine, index: int, tokens: int) -> tuple[float, float, int]:
    started = time.monotonic()
    first = 0.0
    async for chunk in engine.generate(request(index, tokens)):
        first = first or time.monotonic() - started
        if chunk.is_final:
            assert chunk.usage is not None
            return first, time.monotonic() - started, chunk.usage.completion_tokens
    raise RuntimeError("no final chunk")


async def measure(engine: LlamaCppEngine, clients: int, tokens: int) -> tuple[float, float, float]:
    """Aggregate tokens/s, median time to first token (s), ms per token of one stream (median)."""
    await stream(engine, 99, 4)  # warm up
    started = time.monotonic()
    results = await asyncio.gather(*(stream(engine, index, tokens) for index in range(clients)))
    wall = time.monotonic() - started
    produced = sum(count for _, _, count in results)
    per_token = statistics.median(
        1000 * (total - first) / max(1, count - 1) for first, total, count in results
    )
    return produced / wall, statistics.median(first for first, _, _ in results), per_token


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    arguments = parser.parse_args()
    figures: dict[tuple[int, int], float] = {}
    for parallel in (1, 4):
        engine = LlamaCppEngine(
            ModelSettings(context_tokens=1024, threads=arguments.threads, parallel=parallel, embeddings=False)
        )
        await engine.start()
        try:
            for clients in arguments.clients:
                rate, first, per_token = await measure(engine, clients, arguments.tokens)
                figures[parallel, clients] = rate
                print(
                    f"parallel={parallel} clients={clients}: {rate:6.1f} tok/s aggregate, "
                    f"TTFT p50 {first * 1000:7.0f} ms, {per_token:5.1f} ms/token per stream"
                )
        finally:
            await engine.close()
    for clients in arguments.clients:
        print(
            f"clients={clients}: batched/serial aggregate = {figures[4, clients] / figures[1, clients]:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
