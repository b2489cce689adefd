"""Many clients at once: our node against llama.cpp's `llama-server`, same GGUF, same threads, the
same number of parallel slots, 1, 4, 8 and 16 concurrent streaming clients.

llama-server is built from the llama.cpp vendored in the installed llama-cpp-python
(bench/llama_server.py, cached). Our node runs with the defaults a user gets, its model entry
given the same threads, context per slot and slots. Each level runs on both, alternately, with
fresh prompts (no prefix one side has cached and the other not); streaming chat, temperature 0.
Prints aggregate tok/s, per-stream tok/s, TTFT p50 and p95, their ratios and the targets, and the
CPU seconds each side's processes used per 1,000 tokens.

    .venv/bin/python bench/concurrency.py [--slots 4] [--levels 1,4,8,16] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llama_server import start_llama_server  # noqa: E402
from mycellm.engines.model_files import resolve_model_path  # noqa: E402
from mycellm.engines.names import BUNDLED_NAME  # noqa: E402
from tests.nodes import NodeProcess, free_port, session_pids  # noqa: E402

MIN_AGGREGATE_RATIO = 0.9  # our aggregate tok/s over llama-server's, at every level
MAX_TTFT_GROWTH = 2.0  # our TTFT p50 at 4 clients over ours at 1
TOPICS = [
    "the sea",
    "a city at night",
    "an old clock",
    "a mountain road",
    "a small garden",
    "winter",
    "a ship",
]


@dataclass(frozen=True)
class Stream:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True)
class Level:
    streams: list[Stream]
    wall_s: float
    cpu_s: float

    @property
    def aggregate(self) -> float:
        return sum(stream.tokens for stream in self.streams) / self.wall_s

    @property
    def per_stream(self) -> float:
        return statistics.median(s.tokens / s.total_s for s in self.streams)

    def ttft_ms(self, quantile: float) -> float:
        values = sorted(stream.ttft_s for stream in self.streams)
        return values[min(len(values) - 1, int(quantile * len(values)))] * 1000

    @property
    def cpu_per_1000_tokens(self) -> float:
        return self.cpu_s / max(1, sum(stream.tokens for stream in self.streams)) * 1000


async def _stream(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Stream:
    started = time.perf_counter()
    first, tokens = None, 0
    response = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = 0
    async for chunk in response:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            first = first or time.perf_counter() - started
    return Stream(first or time.perf_counter() - started, time.perf_counter() - started, tokens or chunks)


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user and system) the live processes ``pids`` used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _level(url: str, model: str, clients: int, max_tokens: int, pids: list[int], round_: int) -> Level:
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    prompts = [
        f"Write a short story about {TOPICS[(round_ + index) % len(TOPICS)]} (story {round_}-{index})."
        for index in range(clients)
    ]
    cpu = _cpu(pids)
    started = time.perf_counter()
    streams = await asyncio.gather(*(_stream(client, model, prompt, max_tokens) for prompt in prompts))
    wall = time.perf_counter() - started
    await client.close()
    return Level(list(streams), wall, _cpu(pids) - cpu)


def _row(name: str, ours: float, theirs: float, target: str = "") -> str:
    ratio = ours / theirs if theirs else float("nan")
    return f"{name:<28}{ours:>12.1f}{theirs:>14.1f}{ratio:>8.3f}  {target}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--context", type=int, default=2048, help="context tokens per slot")
    parser.add_argument("--rounds", type=int, default=2, help="alternate runs per level and side")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    model_path = resolve_model_path("smollm2")
    work = Path(tempfile.mkdtemp(prefix="mycellm-bench-concurrency-"))
    entry = {"threads": args.threads, "context_tokens": args.context, "parallel": args.slots}
    node = NodeProcess(work / "node", env={"MYCELLM_MODELS": json.dumps([entry])})
    port = free_port()
    server = start_llama_server(
        model_path,
        port,
        threads=args.threads,
        context=args.context * args.slots,
        slots=args.slots,
        log=work / "llama-server.log",
    )
    try:
        node.start()
        assert node.process is not None
        sides = {
            "ours": (f"{node.url}/v1", BUNDLED_NAME, [node.process.pid, *session_pids(node.process.pid)]),
            "llama-server": (f"http://127.0.0.1:{port}/v1", "model", [server.pid]),
        }
        print(
            f"model {model_path.name}, {args.threads} threads, {args.slots} slots, context {args.context} per slot"
        )
        print(f"{'':<28}{'ours':>12}{'llama-server':>14}{'ratio':>8}  target")
        asyncio.run(_warm(sides, args.max_tokens))
        ttft_at_1 = None
        for clients in levels:
            results: dict[str, list[Level]] = {"ours": [], "llama-server": []}
            for round_ in range(args.rounds):
                for side, (url, model, pids) in sides.items():
                    level = asyncio.run(
                        _level(url, model, clients, args.max_tokens, pids, round_ * 100 + clients)
                    )
                    results[side].append(level)
            ours, theirs = (_merged(results[side]) for side in ("ours", "llama-server"))
            ttft_at_1 = ours.ttft_ms(0.5) if clients == 1 else ttft_at_1
            print(f"-- {clients} clients")
            print(_row("aggregate tok/s", ours.aggregate, theirs.aggregate, f">= {MIN_AGGREGATE_RATIO}"))
            print(_row("per-stream tok/s (median)", ours.per_stream, theirs.per_stream))
            growth = (
                f"<= {MAX_TTFT_GROWTH:g}x ours at 1 ({ttft_at_1:.0f} ms)"
                if clients == 4 and ttft_at_1
                else ""
            )
            print(_row("TTFT p50 ms", ours.ttft_ms(0.5), theirs.ttft_ms(0.5), growth))
            print(_row("TTFT p95 ms", ours.ttft_ms(0.95), theirs.ttft_ms(0.95)))
            print(_row("CPU s per 1,000 tokens", ours.cpu_per_1000_tokens, theirs.cpu_per_1000_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)
        if node.process is not None and node.process.poll() is None:
            node.stop()


async def _warm(sides: dict[str, tuple[str, str, list[int]]], max_tokens: int) -> None:
    for url, model, pids in sides.values():
        await _level(url, model, 1, max_tokens, pids, -1)


def _merged(levels: list[Level]) -> Level:
    return Level(
        [stream for level in levels for stream in level.streams],
        sum(level.wall_s for level in levels),
        sum(level.cpu_s for level in levels),
    )


if __name__ == "__main__":
    main()
