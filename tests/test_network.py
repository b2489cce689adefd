"""Three real nodes linked by QUIC: A relays, B and C serve; a model only on C is served through A,
C dies mid-stream and the stream goes on from B, the registry notices, C comes back and is used."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.nodes import LONG_JSON, NodeProcess, start_all

pytestmark = [pytest.mark.node, pytest.mark.timeout(600)]

BUNDLED = "SmolLM2-135M-Instruct"
HEARTBEAT_S = 0.5
MISSES = 3
PEER_SETTINGS = {
    "heartbeat_interval_s": HEARTBEAT_S,
    "heartbeat_misses": MISSES,
    "reconnect_max_backoff_s": 1.0,
}


def _node(root: Path, name: str, config: dict[str, Any]) -> NodeProcess:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"node_name": name, **PEER_SETTINGS, **config}))
    return NodeProcess(root / name, args=["--config", str(path)], env={"MYCELLM_NODE_NAME": name})


def _model(**fields: Any) -> dict[str, Any]:
    return {"path": "smollm2", "context_tokens": 1024, "threads": 1, **fields}


class Network:
    def __init__(self, root: Path) -> None:
        self.c = _node(root, "c", {"models": [_model(tier="capable"), _model(name="smol-c")]})
        self.b = _node(root, "b", {"models": [_model(tier="fast")], "bootstrap_peers": [self.c.quic_address]})
        self.a = _node(root, "a", {"models": [], "bootstrap_peers": [self.b.quic_address]})
        self.ids: dict[str, str] = {}

    def start(self) -> None:
        start_all(self.a, self.b, self.c)
        for name in "abc":
            self.ids[name] = httpx.get(f"{getattr(self, name).url}/v1/node/status", timeout=10).json()[
                "peer_id"
            ]

    def peers_of_a(self) -> dict[str, Any]:
        return httpx.get(f"{self.a.url}/v1/node/peers", timeout=10).json()


def _wait(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("network"))
    try:
        network.start()
        yield network
    finally:
        for node in (network.a, network.b, network.c):
            node.kill()


@pytest.fixture(scope="module")
def via_a(network: Network) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{network.a.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _routes(network: Network) -> dict[str, set[str]]:
    cards = httpx.get(f"{network.a.url}/v1/models", timeout=10).json()["data"]
    return {card["id"]: {route["node"] for route in card["mycellm"]["routes"]} for card in cards}


def test_the_network_forms_and_lists_every_model_with_where_it_is_served(network: Network) -> None:
    # A was only told about B; it learns C from B and links to it directly.
    _wait(
        lambda: {network.ids["b"], network.ids["c"]} <= set(network.peers_of_a()["connected"]),
        30,
        "A's links",
    )
    routes = _wait(lambda: (r := _routes(network)).get("smol-c") and r, 10, "C's models on A")
    assert routes["smol-c"] == {network.ids["c"]}
    assert routes[BUNDLED] == {network.ids["b"], network.ids["c"]}
    record = next(peer for peer in network.peers_of_a()["data"] if peer["peer_id"] == network.ids["c"])
    assert record["state"] == "alive" and record["node_name"] == "c" and record["rtt_ms"] is not None
    shown = subprocess.run(
        [sys.executable, "-m", "mycellm", "peers", "--url", f"{network.a.url}/v1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": "/tmp"},
    )
    assert shown.returncode == 0, shown.stderr
    assert network.ids["c"][:16] in shown.stdout and "alive" in shown.stdout and "smol-c" in shown.stdout


def test_a_model_only_on_c_is_streamed_through_a(network: Network, via_a: openai.OpenAI) -> None:
    raw = via_a.chat.completions.with_raw_response.create(
        model="smol-c",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-mycellm-routed-to"] == network.ids["c"]
    chunks = list(raw.parse())
    assert chunks[0].model_extra["mycellm"]["served_by"] == network.ids["c"]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 16
    answer = via_a.chat.completions.create(
        model="smol-c", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.model_extra["mycellm"] == {
        "route": "peer",
        "target": network.ids["c"],
        "served_by": network.ids["c"],
    }

    # C recorded what it served for A under the same request id.
    def recorded_on_c() -> bool:
        served = httpx.get(f"{network.c.url}/v1/node/requests", timeout=10).json()["data"]
        return any(record["request_id"] == answer.id and record["outcome"] == "ok" for record in served)

    _wait(recorded_on_c, 5, "C's record of the request")

    # A paid C: one receipt, signed by both, recorded on both ledgers; A spent what C earned.
    def receipt_on(node: NodeProcess) -> dict[str, Any] | None:
        page = httpx.get(f"{node.url}/v1/node/receipts", params={"model": "smol-c"}, timeout=10).json()[
            "data"
        ]
        return next((receipt for receipt in page if receipt["request_id"] == answer.id), None)

    on_a = _wait(lambda: receipt_on(network.a), 10, "the receipt on A")
    on_c = _wait(lambda: receipt_on(network.c), 10, "the receipt on C")
    assert on_a["receipt"] == on_c["receipt"] and on_a["price"] > 0
    status_c = httpx.get(f"{network.c.url}/v1/node/status", timeout=10).json()
    assert on_a["seeder"] == status_c["account_id"]
    credits_a = httpx.get(f"{network.a.url}/v1/node/credits", timeout=10).json()
    assert credits_a["balance"] < 100.0 and credits_a["transfers"][0]["kind"] == "spend"


def test_routing_options_that_cannot_be_met_give_422(network: Network) -> None:
    for options, fragment in (
        ({"min_tier": "frontier"}, "tier frontier"),
        ({"required_tags": ["gpu"]}, "tags ['gpu']"),
    ):
        response = httpx.post(
            f"{network.a.url}/v1/chat/completions",
            json={"model": BUNDLED, "messages": [{"role": "user", "content": "x"}], "mycellm": options},
            timeout=30,
        )
        assert response.status_code == 422
        assert fragment in response.json()["error"]["message"]
    # min_tier capable leaves only C's copy of the bundled model.
    response = httpx.post(
        f"{network.a.url}/v1/chat/completions",
        json={
            "model": BUNDLED,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "mycellm": {"min_tier": "capable"},
        },
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-mycellm-routed-to"] == network.ids["c"]


def test_a_request_its_node_cannot_pay_for_gets_402_before_any_work(network: Network) -> None:
    served_before = httpx.get(f"{network.c.url}/v1/node/requests", timeout=10).json()["data"]
    response = httpx.post(
        f"{network.a.url}/v1/chat/completions",
        json={"model": "smol-c", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000_000},
        timeout=30,
    )
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_credits" and "does not cover the price" in error["message"]
    assert httpx.get(f"{network.c.url}/v1/node/requests", timeout=10).json()["data"] == served_before


def test_a_client_that_leaves_cancels_the_generation_on_the_remote_node(network: Network) -> None:
    body = {
        "model": "smol-c",
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long essay."}],
        "max_tokens": 900,
        "response_format": LONG_JSON,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{network.a.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        first = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in first)

    def cancelled_on_c() -> bool:
        records = httpx.get(f"{network.c.url}/v1/node/requests", timeout=10).json()["data"]
        return any(record["model"] == "smol-c" and record["outcome"] == "cancelled" for record in records)

    _wait(cancelled_on_c, 15, "the cancellation on C")
    workers = httpx.get(f"{network.c.url}/v1/node/status", timeout=10).json()["workers"]
    assert all(worker["active_requests"] == 0 for worker in workers)


def test_a_stream_survives_the_death_of_its_node_and_the_registry_notices(network: Network) -> None:
    # C is preferred for the bundled model (tier capable over B's fast); it dies mid-answer.
    body = {
        "model": BUNDLED,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    usage: dict[str, int] | None = None
    finish = None
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{network.a.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["x-mycellm-routed-to"] == network.ids["c"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = httpx.Response(200, content=line[6:]).json()
            assert "error" not in payload, payload
            if payload.get("choices"):
                texts.append(payload["choices"][0]["text"])
                request_id = payload["id"]
                finish = payload["choices"][0]["finish_reason"] or finish
                if len(texts) == 3:
                    network.c.kill()
            if payload.get("usage"):
                usage = payload["usage"]
    text = "".join(texts)
    assert finish == "length" and usage is not None
    # Exact usage for the whole answer, across both nodes.
    assert usage["completion_tokens"] == 400
    numbers = [int(number) for number in re.findall(r"\d+", text)][:-1]  # the last may be cut short
    assert len(numbers) > 50 and numbers[0] == 9
    assert numbers == sorted(numbers), f"the resumed answer repeats or goes back: {text!r}"

    def finished_on_b() -> bool:
        records = httpx.get(f"{network.a.url}/v1/node/requests", timeout=10).json()["data"]
        record = next((record for record in records if record["request_id"] == request_id), None)
        return record is not None and record["route_target"] == network.ids["b"] and record["outcome"] == "ok"

    _wait(finished_on_b, 5, "A's record of the request, finished by B")

    # The registry marks C dead within the heartbeat window (plus the time a kill takes).
    def c_is_dead() -> bool:
        record = next(peer for peer in network.peers_of_a()["data"] if peer["peer_id"] == network.ids["c"])
        return record["state"] == "dead"

    _wait(c_is_dead, HEARTBEAT_S * (MISSES + 2) + 2, "C marked dead")
    assert network.ids["c"] not in network.peers_of_a()["connected"]
    _wait(lambda: "smol-c" not in _routes(network), 5, "smol-c to leave the routes")
    missing = httpx.post(
        f"{network.a.url}/v1/chat/completions",
        json={"model": "smol-c", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert missing.status_code == 404


def test_c_comes_back_and_is_used_again(network: Network, via_a: openai.OpenAI) -> None:
    network.c.start()  # same data dir (same peer id) and ports
    _wait(lambda: network.ids["c"] in network.peers_of_a()["connected"], 30, "A's link to C again")
    _wait(lambda: "smol-c" in _routes(network), 10, "C's models on A again")
    raw = via_a.chat.completions.with_raw_response.create(
        model="smol-c", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert raw.headers["x-mycellm-routed-to"] == network.ids["c"]


def test_a_route_that_fails_before_any_output_is_replaced_by_the_next(network: Network) -> None:
    # A non-streamed answer sends nothing before it is whole: C dies while generating it, and A
    # asks B instead. The client sees one normal answer.
    result: dict[str, httpx.Response] = {}

    def ask() -> None:
        result["response"] = httpx.post(
            f"{network.a.url}/v1/completions",
            json={"model": BUNDLED, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0},
            timeout=120,
        )

    asker = threading.Thread(target=ask)
    asker.start()
    _wait(lambda: _served_on(network.c), 10, "C to start generating")
    network.c.kill()
    asker.join(timeout=120)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.headers["x-mycellm-routed-to"] == network.ids["b"]
    body = response.json()
    assert body["mycellm"]["served_by"] == network.ids["b"]
    assert body["usage"]["completion_tokens"] == 400 and body["choices"][0]["finish_reason"] == "length"


def _served_on(node: NodeProcess) -> bool:
    workers = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["workers"]
    return any(worker["active_requests"] > 0 for worker in workers)
