"""Soak: three real nodes and a hostile peer on loopback for a while; does anything grow or break?

Three ``mycellm serve`` nodes (tests/nodes.py), short heartbeats; C hosts the public network, A and B
join it. Each serves the bundled model and a copy under its own name (``smol-a`` ...): asking a node
for another's name is forwarded and paid with a receipt. A client thread per node asks for both,
streamed or not; every request must be answered (a 402 too: the grant covers the soak many times).
``bench/hostile_peer.py``, a process with a valid identity of its own, attacks every node meanwhile.
Every ``--sample-s`` each node's session (the node and its Ray processes) is sampled: fds, RSS and
threads summed over its processes, log bytes, requests in flight, peers connected/known (no endpoint
exposes asyncio task counts). After the warm-up sample, the mean of the last third is compared to the
middle third (under 3 samples: last to first). Then SIGTERM (exit 0) and ``mycellm ledger audit``
(clean; balances = grants issued). Prints markdown tables; exits 1 if a check fails. By hand:

    .venv/bin/python bench/soak.py [--minutes 10] [--sample-s 60] [--max-tokens 8] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.soak_samples import sample  # noqa: E402
from mycellm.engines.names import BUNDLED_NAME  # noqa: E402
from mycellm.identity.revocation_keeper import KNOWN_REVOCATIONS_FILE  # noqa: E402
from mycellm.identity.revocations import REVOCATION_BOOK_MAX_BYTES  # noqa: E402
from tests.nodes import NodeProcess, node_environment, start_all  # noqa: E402

NAMES = ("a", "b", "c")
# Short heartbeats and redials: a lively soak.
LIVELY = {"heartbeat_interval_s": 1.0, "heartbeat_misses": 5}
LIVELY |= {"reconnect_max_backoff_s": 2.0, "peer_exchange_interval_s": 5.0}
TOLERANCE = {"fds": 0.20, "rss_mib": 0.15, "threads": 0.20}
PROMPT = [{"role": "user", "content": "Say yes."}]
MESH_WAIT_S = 240.0
MAX_INBOUND = 64  # the nodes' max_inbound_links (the default)


def _model(name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": "smollm2", "context_tokens": 512, "threads": 1}
    return entry if name is None else {**entry, "name": name}


def make_nodes(root: Path) -> tuple[dict[str, NodeProcess], dict[str, Path]]:
    """The three nodes (not started) and their config files."""
    nodes: dict[str, NodeProcess] = {}
    configs: dict[str, Path] = {}
    for name in ("c", "b", "a"):  # C first: the others bootstrap to it
        bootstrap = {"c": [], "b": ["c"], "a": ["c", "b"]}[name]
        peers = [nodes[other].quic_address for other in bootstrap]
        models = [_model(), _model(f"smol-{name}")]
        config = {"node_name": name, **LIVELY, "models": models, "bootstrap_peers": peers}
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))
        env = {"MYCELLM_NODE_NAME": name}
        nodes[name] = NodeProcess(root / name, args=["--config", str(configs[name])], env=env)
    return {name: nodes[name] for name in NAMES}, configs


def wait_for_mesh(nodes: dict[str, NodeProcess]) -> None:
    """Until every node lists every node's own model (so it has a route to each)."""
    wanted = {f"smol-{name}" for name in NAMES}
    deadline = time.monotonic() + MESH_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            cards = [httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"] for node in nodes.values()]
            if all(wanted <= {card["id"] for card in listed} for listed in cards):
                return
        time.sleep(1.0)
    raise SystemExit(f"the mesh did not form within {MESH_WAIT_S:.0f} s")


class Honest(threading.Thread):
    """One client of one node: chat completions, streamed or not, local and through peers, in turn."""

    def __init__(self, name: str, node: NodeProcess, stop: threading.Event, max_tokens: int) -> None:
        super().__init__(daemon=True, name=f"honest-{name}")
        others = [f"smol-{other}" for other in NAMES if other != name]
        self.plan = [(BUNDLED_NAME, False), (others[0], True), (BUNDLED_NAME, True), (others[1], False)]
        self.node, self.stop, self.max_tokens = node, stop, max_tokens
        self.lock = threading.Lock()
        self.ok = self.failed = self.paid_refusals = self.peer_answers = 0
        self.taken = (0, 0)
        self.reasons: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.node.url, timeout=180.0) as http:
            node_id = http.get("/v1/node/status").json()["peer_id"]  # others answer as peers
            for model, stream in itertools.cycle(self.plan):
                if self.stop.is_set():
                    return
                try:
                    routed = self.one(http, model, stream)
                    with self.lock:
                        self.ok += 1
                        self.peer_answers += routed != node_id
                except Exception as error:
                    with self.lock:
                        self.failed += 1
                        self.paid_refusals += "402" in str(error)
                        if len(self.reasons) < 5:
                            self.reasons.append(f"{model} stream={stream}: {error}"[:300])
                self.stop.wait(0.2)

    def one(self, http: httpx.Client, model: str, stream: bool) -> str:
        """One request; the peer that answered it. Raises on anything but a full answer."""
        body = {"model": model, "messages": PROMPT, "max_tokens": self.max_tokens, "stream": stream}
        with http.stream("POST", "/v1/chat/completions", json={**body, "temperature": 0}) as response:
            text = response.read().decode()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {text[:200]}")
        if stream:
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            if events[-1:] != ["[DONE]"] or any("error" in json.loads(event) for event in events[:-1]):
                raise RuntimeError(f"the stream failed: {text[-200:]}")
        elif not json.loads(text)["choices"]:
            raise RuntimeError("no choices")
        return response.headers.get("x-mycellm-routed-to", "")

    def take(self) -> tuple[int, int]:
        """(answered, failed) since the last take."""
        with self.lock:
            before, self.taken = self.taken, (self.ok, self.failed)
        return self.taken[0] - before[0], self.taken[1] - before[1]


class HostilePeer:
    """bench/hostile_peer.py in its own process; its stats file is read at each sample."""

    def __init__(self, root: Path, nodes: dict[str, NodeProcess]) -> None:
        self.stats_path = root / "hostile-stats.json"
        self.log_path = root / "hostile.log"
        targets = [f"--target={name}={node.quic_address}" for name, node in nodes.items()]
        script, data = str(ROOT / "bench" / "hostile_peer.py"), str(root / "hostile")
        command = [sys.executable, script, "--data-dir", data, "--bootstrap", nodes["c"].quic_address]
        command += ["--stats", str(self.stats_path), *targets]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.before: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.stats_path.read_text()))
        return {}

    def sent_since(self) -> dict[str, int]:
        """Actions sent to each node since the last call."""
        totals = {name: sum(counts.values()) for name, counts in self.stats().get("sent", {}).items()}
        deltas = {name: total - self.before.get(name, 0) for name, total in totals.items()}
        self.before = totals
        return deltas

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
            self.process.kill()  # unless it stopped
        return self.process.wait()


def trend(samples: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    """(mean of the middle third, mean of the last third, growth) of ``key`` after the warm-up sample."""
    values = [float(row[key]) for row in samples[1:]]
    third = len(values) // 3
    middle, last = (values[third : 2 * third], values[2 * third :]) if third else (values[:1], values[-1:])
    before, after = sum(middle) / len(middle), sum(last) / len(last)
    return before, after, (after - before) / before if before else 0.0


def audit(node: NodeProcess, config: Path) -> tuple[bool, str, dict[str, float]]:
    """``mycellm ledger audit`` on a stopped node: (clean, its output, receipts/issued/balances)."""
    command = [sys.executable, "-m", "mycellm", "ledger", "audit", "--config", str(config)]
    command += ["--data-dir", str(node.data_dir)]
    env = node_environment({"COLUMNS": "400"})
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    text = (result.stdout + result.stderr).strip()
    found = re.findall(r"(\d+) receipts, \d+ accounts, issued ([\d.]+), balances ([\d.]+)", text)
    sums = (sum(float(network[index]) for network in found) for index in range(3))
    numbers = dict(zip(("receipts", "issued", "balances"), sums, strict=True))
    return result.returncode == 0 and "ok:" in text, text, numbers


Checks = list[tuple[str, str, str, bool]]  # (check, node, detail, passed)


def run(args: argparse.Namespace, root: Path) -> Checks:
    """The soak itself: start, traffic and floods, samples, then stop and audit; the checks."""
    nodes, configs = make_nodes(root)
    stop, checks = threading.Event(), []
    hostile: HostilePeer | None = None
    try:
        print(f"starting three nodes under {root} ...", flush=True)
        start_all(*nodes.values())
        wait_for_mesh(nodes)
        clients = {name: Honest(name, node, stop, args.max_tokens) for name, node in nodes.items()}
        hostile = HostilePeer(root, nodes)
        for client in clients.values():
            client.start()
        samples = soak(args, nodes, clients, hostile)
        stop.set()
        for client in clients.values():
            client.join(timeout=240)
        code = hostile.stop()
        checks += traffic_checks(clients, hostile.stats(), samples)
        checks.append(("hostile peer ran to the end", "-", f"exit {code}", code == 0))
        checks += trend_checks(samples) + shutdown_checks(nodes, configs)
    finally:
        stop.set()
        if hostile is not None:
            hostile.stop()
        for node in nodes.values():
            node.kill()
    return checks


def soak(
    args: argparse.Namespace, nodes: dict[str, NodeProcess], clients: dict[str, Honest], hostile: HostilePeer
) -> dict[str, list[dict[str, Any]]]:
    """Sample every node at the start and every ``sample_s`` until ``minutes`` are over; print each."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in nodes}
    print(f"\n| minute | node | {' | '.join(COLUMNS)} |\n|---:|---|{'---:|' * len(COLUMNS)}")
    started, taken = time.monotonic(), 0
    end = started + args.minutes * 60
    while True:
        sent = hostile.sent_since()
        for name, node in nodes.items():
            row = sample(node)
            row["alive"] = node.process is not None and node.process.poll() is None
            ok, failed = clients[name].take()
            row["honest"], row["hostile"] = f"{ok}/{failed}", sent.get(name, 0)
            samples[name].append(row)
            cells = (f"{row[k]:.0f}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS.values())
            print(f"| {(time.monotonic() - started) / 60:.1f} | {name} | {' | '.join(cells)} |", flush=True)
        if time.monotonic() >= end - 1:
            return samples
        taken += 1
        time.sleep(max(0.0, min(started + taken * args.sample_s, end) - time.monotonic()))


# The table's columns after minute and node: heading -> key of a sample.
COLUMNS = {"fds": "fds", "rss MiB": "rss_mib", "threads": "threads", "logs MiB": "logs_mib"}
COLUMNS |= {"in flight": "in_flight", "peers conn/known": "peers", "inbound now/peak": "inbound"}
COLUMNS |= {"honest ok/failed": "honest", "hostile sent": "hostile"}


def traffic_checks(
    clients: dict[str, Honest], stats: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
) -> Checks:
    """Every honest request answered, some through peers; the hostile peer attacked and was refused."""
    checks: Checks = []
    for name, client in clients.items():
        detail = f"{client.ok} answered ({client.peer_answers} by a peer), {client.failed} failed"
        detail += f" ({client.paid_refusals} of them 402)" if client.paid_refusals else ""
        detail += "".join(f"<br>{reason}" for reason in client.reasons[:3])
        checks.append(("every honest request answered", name, detail, client.failed == 0 and client.ok > 0))
        checks.append(
            ("honest requests served by a peer", name, str(client.peer_answers), client.peer_answers > 0)
        )
    for name, counts in sorted(stats.get("sent", {}).items()):
        detail = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
        checks.append(("hostile peer attacked", name, detail or "nothing", sum(counts.values()) > 0))
    seen: dict[str, int] = stats.get("seen", {})
    view = ", ".join(f"{kind} {count}" for kind, count in sorted(seen.items()))
    checks.append(("(the hostile peer saw)", "-", view or "nothing", True))
    silent = sum(count for kind, count in seen.items() if kind.startswith("silent_"))
    closed, still_open = silent > 0 and not seen.get("silent_open"), seen.get("silent_open", 0)
    checks.append(("silent links closed (no hello)", "-", f"{silent - still_open} of {silent}", closed))
    refused = seen.get("inbound_busy", 0) + seen.get("inbound_no_handshake", 0)
    # What the nodes say they held at most (the hostile peer cannot tell why a link it held closed).
    peaks = {
        name: max((row["inbound_peak"] for row in series), default=0) for name, series in samples.items()
    }
    most = max(peaks.values(), default=0)
    detail = f"{refused} busy or dropped; the nodes held at most {peaks} inbound (cap {MAX_INBOUND})"
    checks.append(("inbound links over the cap refused", "-", detail, refused > 0 and most <= MAX_INBOUND))
    return checks


def trend_checks(samples: dict[str, list[dict[str, Any]]]) -> Checks:
    checks: Checks = []
    for name, series in samples.items():
        alive = all(row["alive"] for row in series)
        checks.append(("node alive at every sample", name, f"{len(series)} samples", alive))
        for key, tolerance in TOLERANCE.items():
            before, after, growth = trend(series, key)
            detail = f"{before:.0f} → {after:.0f} ({growth:+.1%}; at most {tolerance:+.0%})"
            checks.append((f"{key} do not grow", name, detail, growth <= tolerance))
    return checks


def _stop(node: NodeProcess) -> int | str:
    try:
        return node.stop(timeout_s=120)
    except Exception as error:
        return type(error).__name__


def shutdown_checks(nodes: dict[str, NodeProcess], configs: dict[str, Path]) -> Checks:
    """SIGTERM to all nodes at once (exit 0), then each one's books audited, and its revocation book."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        codes = dict(zip(nodes, pool.map(_stop, nodes.values()), strict=True))
    checks: Checks = []
    for name, node in nodes.items():
        checks.append(("stops cleanly on SIGTERM", name, f"exit {codes[name]}", codes[name] == 0))
        node.kill()  # whatever of its session is left
        clean, text, numbers = audit(node, configs[name])
        problem = next((line for line in text.splitlines() if "mismatch" in line or "rror" in line), "")
        detail = f"{numbers['receipts']:.0f} receipts" + (f"; {problem[:200]}" if problem else "")
        checks.append(("ledger audit clean", name, detail, clean))
        issued, balances = numbers["issued"], numbers["balances"]
        balanced = issued > 0 and abs(balances - issued) < 1e-6
        checks.append(
            ("balances sum to the grants", name, f"issued {issued:.6f}, held {balances:.6f}", balanced)
        )
        book = node.data_dir / KNOWN_REVOCATIONS_FILE
        size = book.stat().st_size if book.exists() else 0
        checks.append(
            ("revocation book within its cap", name, f"{size} bytes", size <= REVOCATION_BOOK_MAX_BYTES)
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mycellm-soak-"))
    checks = run(args, root)
    print("\n| check | node | detail | result |\n|---|---|---|---|")
    for check, node, detail, passed in checks:
        print(f"| {check} | {node} | {detail} | {'PASS' if passed else 'FAIL'} |")
    failed = [check for check in checks if not check[3]]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed; logs in {root}")
    if not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
