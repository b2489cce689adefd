"""What a mycellm node costs over a bare engine: our node vs llama-cpp-python's own OpenAI server.

Both serve the same GGUF file with the same thread count, in one run, measured alternately.
Prints median time to first token, decode tokens/s and aggregate tokens/s, streaming and not,
at 1 and 4 concurrent clients, and our/peer ratios.

    .venv/bin/python bench/local_overhead.py [--requests 8] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.openai_load import ScenarioResult, run_scenario  # noqa: E402
from mycellm.engines.model_files import resolve_model_path  # noqa: E402
from mycellm.engines.names import BUNDLED_NAME  # noqa: E402
from tests.nodes import NodeProcess, free_port  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper and the sea.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a large city.",
    "Write a letter to a friend about your summer holidays.",
    "Tell me everything you know about the history of bread.",
    "Write a long poem about mountains, rivers and the wind.",
    "Describe how to plan and plant a vegetable garden.",
    "Write a story about a robot who learns to paint.",
]


def start_peer(model_path: Path, threads: int, context: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        BUNDLED_NAME,
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(context),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "False",
        "--interrupt_requests",
        "False",  # it would otherwise cut running streams short
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, f"{url}/v1"
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("llama_cpp.server did not start")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if not ours or not theirs else f"{ours / theirs:.3f}"


async def measure(targets: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, ScenarioResult]]:
    scenarios = [(1, True), (1, False), (4, True), (4, False)]
    results: dict[str, dict[str, ScenarioResult]] = {name: {} for name in targets}
    for url in targets.values():  # warm both: model pages, prompt cache paths, connections
        await run_scenario(url, BUNDLED_NAME, PROMPTS[:2], concurrency=1, stream=True, max_tokens=16)
    for concurrency, stream in scenarios:
        key = f"{'stream' if stream else 'plain'} c={concurrency}"
        prompts = (PROMPTS * 4)[: args.requests * (2 if concurrency > 1 else 1)]
        # Alternate halves so slow drift of the machine hits both sides alike.
        half = len(prompts) // 2
        parts: dict[str, list[ScenarioResult]] = {name: [] for name in targets}
        for chunk in (prompts[:half], prompts[half:]):
            for name, url in targets.items():
                parts[name].append(
                    await run_scenario(
                        url,
                        BUNDLED_NAME,
                        chunk,
                        concurrency=concurrency,
                        stream=stream,
                        max_tokens=args.max_tokens,
                    )
                )
        for name in targets:
            merged = ScenarioResult(
                [s for part in parts[name] for s in part.samples], sum(p.wall_s for p in parts[name])
            )
            results[name][key] = merged
    return results


def report(results: dict[str, dict[str, ScenarioResult]]) -> list[dict[str, object]]:
    rows = []
    header = f"{'scenario':<14}{'metric':<22}{'mycellm':>12}{'llama_cpp.server':>18}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for key, ours in results["mycellm"].items():
        theirs = results["peer"][key]
        metrics = [
            ("ttft median ms", ours.median_ttft_ms, theirs.median_ttft_ms),
            ("decode tok/s median", ours.median_decode_tokens_per_s, theirs.median_decode_tokens_per_s),
            ("aggregate tok/s", ours.aggregate_tokens_per_s, theirs.aggregate_tokens_per_s),
            ("latency median ms", ours.median_latency_ms, theirs.median_latency_ms),
        ]
        for metric, a, b in metrics:
            if a is None and b is None:
                continue
            print(f"{key:<14}{metric:<22}{fmt(a):>12}{fmt(b):>18}{ratio(a, b):>9}")
            rows.append({"scenario": key, "metric": metric, "mycellm": a, "peer": b})
        if ours.median_ttft_ms is not None and theirs.median_ttft_ms is not None:
            print(f"{key:<14}{'ttft added ms':<22}{ours.median_ttft_ms - theirs.median_ttft_ms:>12.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=8, help="requests per scenario at concurrency 1")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    model_path = resolve_model_path("smollm2")
    data_dir = Path(tempfile.mkdtemp(prefix="mycellm-bench-")) / "data"
    node = NodeProcess(
        data_dir,
        env={"MYCELLM_MODELS": json.dumps([{"threads": args.threads, "context_tokens": args.context}])},
    )
    peer, peer_url = start_peer(model_path, args.threads, args.context)
    try:
        node.start()
        targets = {"mycellm": f"{node.url}/v1", "peer": peer_url}
        print(
            f"model {model_path.name}, {args.threads} threads, max_tokens {args.max_tokens}, cores {os.cpu_count()}"
        )
        results = asyncio.run(measure(targets, args))
        rows = report(results)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        peer.terminate()
        peer.wait(timeout=30)
        if node.process is not None and node.process.poll() is None:
            node.stop()


if __name__ == "__main__":
    main()
