"""How long a stream pauses when the node serving it dies: SIGKILL to the next chunk the client gets.

Three real nodes on loopback with the defaults a user gets (heartbeats every 5 s, three misses):
C serves the bundled model, B serves it too and has C as its bootstrap, A serves nothing and has
B as its bootstrap, so A routes to B or C. A client streams a long counting answer through A;
after ``--after`` chunks the node serving it is SIGKILLed, and the clock runs from the kill to the
next chunk the client reads (the answer goes on from the other node, resumed where it broke off).
The killed node is started again (same data directory and ports) before the next run.

Without the stall probe a dead peer is only noticed by its missed heartbeats (about
``heartbeat_interval_s * heartbeat_misses``, 15 s by default); the target is under 2 s (median).

    .venv/bin/python bench/failover.py [--runs 3] [--after 20] [--max-tokens 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mycellm.engines.names import BUNDLED_NAME  # noqa: E402
from tests.nodes import NodeProcess, start_all  # noqa: E402

TARGET_S = 2.0
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def _node(root: Path, name: str, config: dict[str, Any]) -> NodeProcess:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"node_name": name, **config}))
    return NodeProcess(root / name, args=["--config", str(path)], env={"MYCELLM_NODE_NAME": name})


def _model() -> dict[str, Any]:
    return {"path": "smollm2", "context_tokens": 1024, "threads": 1}


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not happen within {timeout_s} s")


def _serving_nodes(relay: NodeProcess) -> set[str]:
    cards = httpx.get(f"{relay.url}/v1/models", timeout=10).json()["data"]
    card = next((card for card in cards if card["id"] == BUNDLED_NAME), None)
    return {route["node"] for route in card["mycellm"]["routes"]} if card else set()


def one_run(relay: NodeProcess, by_id: dict[str, NodeProcess], args: argparse.Namespace) -> dict[str, Any]:
    """Stream through the relay, kill the serving node after ``args.after`` chunks; the timings."""
    body = {
        "model": BUNDLED_NAME,
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, killed_at, last_before, usage = 0, None, None, None
    after: list[float] = []  # when each chunk after the kill was read
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{relay.url}/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        victim = by_id[response.headers["x-mycellm-routed-to"]]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(f"the stream failed: {payload['error']}")
            if payload.get("usage"):
                usage = payload["usage"]
            if not payload.get("choices") or not payload["choices"][0]["text"]:
                continue
            chunks += 1
            now = time.monotonic()
            if killed_at is None and chunks == args.after:
                last_before = now
                victim.sigkill()
                killed_at = time.monotonic()
            elif killed_at is not None:
                after.append(now)
    if killed_at is None or last_before is None or not after:
        raise RuntimeError(f"the answer ended after {chunks} chunks, before the kill took effect")
    # Chunks already on their way still arrive after the kill; the pause is the longest silence
    # after it, and the chunk that ends it is the first one of the node that took over.
    moments = [killed_at, *after]
    gaps = [later - earlier for earlier, later in itertools.pairwise(moments)]
    longest = max(range(len(gaps)), key=gaps.__getitem__)
    return {
        "victim": victim,
        "kill_to_next_s": moments[longest + 1] - killed_at,
        "gap_s": gaps[longest],
        "completion_tokens": (usage or {}).get("completion_tokens"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--after", type=int, default=20, help="chunks read before the kill")
    parser.add_argument("--max-tokens", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mycellm-bench-failover-"))
    c = _node(root, "c", {"models": [_model()]})
    b = _node(root, "b", {"models": [_model()], "bootstrap_peers": [c.quic_address]})
    a = _node(root, "a", {"models": [], "bootstrap_peers": [b.quic_address]})
    nodes = (a, b, c)
    try:
        start_all(*nodes)
        ids = {httpx.get(f"{n.url}/v1/node/status", timeout=10).json()["peer_id"]: n for n in (b, c)}
        results = []
        for run in range(args.runs):
            _wait(lambda: _serving_nodes(a) == set(ids), 90, "both routes on A")
            result = one_run(a, ids, args)
            results.append(result)
            name = "b" if result["victim"] is b else "c"
            print(
                f"  run {run + 1}: killed {name}; resumed {result['kill_to_next_s']:.3f} s after the kill"
                f" (a pause of {result['gap_s']:.3f} s), usage {result['completion_tokens']}"
            )
            result["victim"].kill()  # reaped, its ports free
            result["victim"].start()
        kills = [result["kill_to_next_s"] for result in results]
        median = statistics.median(kills)
        print(
            f"\nSIGKILL of the serving node to the first chunk of the node that took over, {args.runs} runs, default heartbeats (5 s x 3)"
        )
        print(f"  median {median:.3f} s, max {max(kills):.3f} s, min {min(kills):.3f} s")
        verdict = "PASS" if median < TARGET_S else "MISS"
        print(f"  target median < {TARGET_S:.0f} s: {verdict}  (heartbeats alone: about 15 s)")
        print(f"  logs in {root}")
    finally:
        for node in nodes:
            node.kill()


if __name__ == "__main__":
    main()
