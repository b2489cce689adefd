"""What a mycellm node costs over a bare engine: our node vs llama-cpp-python's own OpenAI server.

Both serve the same GGUF file with the same thread count, in one run, measured alternately.
Prints median time to first token, decode tokens/s and aggregate tokens/s, streaming and not,
at 1 and 4 concurrent clients, and our/peer ratios; the CPU seconds per 1,000 tokens of each
side's processes; and, by kind of process, the share of one core our node's processes use while
one answer streams and while idle (the engine's worker apart from the rest of the stack).

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
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import cpu_by_kind, since  # noqa: E402
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


ENGINE_KINDS = ("InferenceWorker",)  # where the model runs; everything else is the stack
IDLE_S = 20.0


async def measure(
    targets: dict[str, str], roots: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, dict[str, ScenarioResult]], dict[str, dict[str, Counter[str]]]]:
    """Each scenario's samples per side, and the CPU seconds each side's processes used in it."""
    scenarios = [(1, True), (1, False), (4, True), (4, False)]
    results: dict[str, dict[str, ScenarioResult]] = {name: {} for name in targets}
    cpu: dict[str, dict[str, Counter[str]]] = {name: {} for name in targets}
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
                before = cpu_by_kind(roots[name])
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
                cpu[name][key] = cpu[name].get(key, Counter()) + since(before, cpu_by_kind(roots[name]))
        for name in targets:
            merged = ScenarioResult(
                [s for part in parts[name] for s in part.samples], sum(p.wall_s for p in parts[name])
            )
            results[name][key] = merged
    return results, cpu


def idle_cpu(roots: dict[str, int]) -> dict[str, Counter[str]]:
    """Each side's CPU seconds by kind of process over IDLE_S seconds of no requests."""
    before = {name: cpu_by_kind(root) for name, root in roots.items()}
    time.sleep(IDLE_S)
    return {name: since(before[name], cpu_by_kind(root)) for name, root in roots.items()}


def report_cpu(
    results: dict[str, dict[str, ScenarioResult]],
    cpu: dict[str, dict[str, Counter[str]]],
    idle: dict[str, Counter[str]],
) -> None:
    print(
        f"\n{'scenario':<14}{'CPU s per 1,000 tokens':<24}{'mycellm':>10}{'llama_cpp.server':>18}{'ratio':>9}"
    )
    for key in results["mycellm"]:
        per_1000 = {
            name: sum(cpu[name][key].values())
            / max(1, sum(s.completion_tokens for s in results[name][key].samples))
            * 1000
            for name in results
        }
        print(
            f"{key:<14}{'':<24}{per_1000['mycellm']:>10.2f}{per_1000['peer']:>18.2f}{ratio(per_1000['mycellm'], per_1000['peer']):>9}"
        )
    wall = results["mycellm"]["stream c=1"].wall_s
    streaming = cpu["mycellm"]["stream c=1"]
    print(f"\nour processes, % of one core    {'stream c=1':>12}{'idle':>8}")
    for kind in sorted(set(streaming) | set(idle["mycellm"]), key=lambda k: -streaming.get(k, 0.0)):
        busy, quiet = streaming.get(kind, 0.0) / wall * 100, idle["mycellm"].get(kind, 0.0) / IDLE_S * 100
        if busy >= 0.05 or quiet >= 0.05:
            print(f"  {kind[:30]:<30}{busy:>12.1f}{quiet:>8.1f}")
    stack = sum(v for k, v in streaming.items() if k not in ENGINE_KINDS) / wall * 100
    stack_idle = sum(v for k, v in idle["mycellm"].items() if k not in ENGINE_KINDS) / IDLE_S * 100
    print(
        f"  {'the stack besides the engine':<30}{stack:>12.1f}{stack_idle:>8.1f}   target <= 10 streaming, <= 3 idle"
    )
    print(
        f"  {'llama_cpp.server (all)':<30}{sum(streaming.values()) and sum(cpu['peer']['stream c=1'].values()) / results['peer']['stream c=1'].wall_s * 100:>12.1f}{sum(idle['peer'].values()) / IDLE_S * 100:>8.1f}"
    )


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
        assert node.process is not None
        roots = {"mycellm": node.process.pid, "peer": peer.pid}
        idle = idle_cpu(roots)
        results, cpu = asyncio.run(measure(targets, roots, args))
        rows = report(results)
        report_cpu(results, cpu, idle)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        peer.terminate()
        peer.wait(timeout=30)
        if node.process is not None and node.process.poll() is None:
            node.stop()


if __name__ == "__main__":
    main()
