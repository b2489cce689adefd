"""The network of an HTTP request: a node hosting two networks, with one seeder in each.

X hosts networks one (default prices) and two (prices a hundred times higher) and serves no model;
P1 joins one with an invite and serves m-one, P2 joins two and serves m-two. A request runs in the
network of its API key, else of its body's ``mycellm.network``, else of its X-Mycellm-Network
header, else X's default (one), and is routed only to that network's members; budgets are priced
by that network; credits and receipts are read per network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from mycellm.cli.app import app
from tests.nodes import NodeProcess, free_udp_port, start_all

pytestmark = [pytest.mark.node, pytest.mark.timeout(600)]

PEER_SETTINGS = {"heartbeat_interval_s": 0.5, "heartbeat_misses": 3, "reconnect_max_backoff_s": 1.0}
HEADER = "X-Mycellm-Network"
DEAR = {"tier_prices": {"tiny": 2.0, "fast": 10.0, "capable": 50.0, "frontier": 200.0}}


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({**PEER_SETTINGS, **config}))
    return path


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return str(result.stdout)


def _model(name: str) -> dict[str, Any]:
    return {"name": name, "path": "smollm2", "context_tokens": 1024, "threads": 1}


class Networks:
    def __init__(self, root: Path) -> None:
        x_dir, quic = root / "x", free_udp_port()
        plain = _write(root / "x.yaml", {"node_name": "x", "models": [], "network": "one"})
        dear = _write(root / "x-dear.yaml", {"node_name": "x", "credits": DEAR})
        common = ("--data-dir", str(x_dir))
        bootstrap = ("--bootstrap", f"127.0.0.1:{quic}")
        self.one = _cli("network", "create", "one", "--private", *bootstrap, *common, "--config", str(plain))
        self.two = _cli("network", "create", "two", "--private", *bootstrap, *common, "--config", str(dear))
        self.one, self.two = self.one.strip(), self.two.strip()
        tokens = {}
        for name in ("one", "two"):
            printed = _cli("network", "invite", name, "--role", "seeder", *common)
            tokens[name] = next(line for line in printed.splitlines() if line.startswith("token: "))[7:]

        def key(*args: str) -> str:
            created = json.loads(_cli("keys", "create", *args, "--json", *common, "--config", str(plain)))
            return str(created["key"])

        self.admin = key("--scope", "inference", "--scope", "read", "--scope", "admin")
        self.key_one = key("--scope", "inference", "--network", "one", "--budget", "0.05")
        self.key_two = key("--scope", "inference", "--network", "two", "--budget", "0.05")
        self.x = NodeProcess(x_dir, quic_port=quic, args=["--config", str(plain)])
        self.p1 = self._seeder(root, "p1", "m-one", tokens["one"])
        self.p2 = self._seeder(root, "p2", "m-two", tokens["two"])
        self.ids: dict[str, str] = {}

    @staticmethod
    def _seeder(root: Path, name: str, model: str, token: str) -> NodeProcess:
        config = _write(root / f"{name}.yaml", {"node_name": name, "models": [_model(model)], "join": token})
        return NodeProcess(root / name, args=["--config", str(config)])

    def start(self) -> None:
        self.x.start()  # the seeders join at start: their bootstrap must be up
        start_all(self.p1, self.p2)
        for name, node in (("x", self.x), ("p1", self.p1), ("p2", self.p2)):
            headers = self.auth(self.admin) if name == "x" else {}
            status = httpx.get(f"{node.url}/v1/node/status", headers=headers, timeout=10).json()
            self.ids[name] = status["peer_id"]

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def models(self, **headers: str) -> set[str]:
        response = httpx.get(f"{self.x.url}/v1/models", headers=self.auth(self.admin) | headers, timeout=10)
        return {card["id"] for card in response.json()["data"]}

    def ask(
        self, model: str, key: str | None = None, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        return httpx.post(
            f"{self.x.url}/v1/chat/completions",
            json=payload | body,
            headers=self.auth(key or self.admin) | (headers or {}),
            timeout=120,
        )

    def served(self, node: NodeProcess) -> int:
        return len(httpx.get(f"{node.url}/v1/node/requests", timeout=10).json()["data"])


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Networks]:
    built = Networks(tmp_path_factory.mktemp("networks"))
    try:
        built.start()
        _wait(lambda: built.models() == {"m-one"} and built.models(**{HEADER: "two"}) == {"m-two"}, "routes")
        yield built
    finally:
        for node in (built.x, built.p1, built.p2):
            node.kill()


def _wait(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come within {timeout_s} s")


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def test_each_network_lists_and_routes_to_its_own_members_only(networks: Networks) -> None:
    assert networks.models() == {"m-one"}  # X's default network: one
    assert networks.models(**{HEADER: "two"}) == {"m-two"}
    assert networks.models(**{HEADER: networks.two[:12]}) == {"m-two"}  # an id prefix names it too
    answer = networks.ask("m-one")
    assert answer.status_code == 200 and answer.headers["x-mycellm-routed-to"] == networks.ids["p1"]
    _error(networks.ask("m-two"), 404, "model_not_found")  # m-two is not in network one
    by_header = networks.ask("m-two", headers={HEADER: "two"})
    assert by_header.status_code == 200 and by_header.headers["x-mycellm-routed-to"] == networks.ids["p2"]
    by_body = networks.ask("m-two", mycellm={"network": networks.two})
    assert by_body.status_code == 200 and by_body.headers["x-mycellm-routed-to"] == networks.ids["p2"]
    # The body wins over the header.
    _error(networks.ask("m-one", headers={HEADER: "one"}, mycellm={"network": "two"}), 404, "model_not_found")


def test_a_network_the_node_is_not_in_is_refused_before_any_work(networks: Networks) -> None:
    before = (networks.served(networks.p1), networks.served(networks.p2))
    error = _error(networks.ask("m-one", headers={HEADER: "nowhere"}), 404, "network_not_found")
    assert error["param"] == HEADER.lower() and "one (" in error["message"] and "two (" in error["message"]
    error = _error(networks.ask("m-one", mycellm={"network": "f" * 64}), 404, "network_not_found")
    assert error["param"] == "mycellm.network"
    assert networks.ask("m-one", mycellm={"network": ""}).status_code == 400
    assert (networks.served(networks.p1), networks.served(networks.p2)) == before


def test_an_api_keys_network_decides_and_cannot_be_overridden(networks: Networks) -> None:
    answer = networks.ask("m-one", networks.key_one)
    assert answer.status_code == 200 and answer.headers["x-mycellm-routed-to"] == networks.ids["p1"]
    error = _error(networks.ask("m-two", networks.key_one, headers={HEADER: "two"}), 403, "wrong_network")
    assert "this API key is for network one" in error["message"]
    _error(networks.ask("m-two", networks.key_one, mycellm={"network": networks.two}), 403, "wrong_network")
    _error(networks.ask("m-two", networks.key_one), 404, "model_not_found")
    # Naming the key's own network again is allowed.
    again = networks.ask("m-one", networks.key_one, headers={HEADER: "one"})
    assert again.status_code == 200


def test_a_keys_budget_is_priced_by_its_network(networks: Networks) -> None:
    # The same request fits a budget of 0.05 credits at network one's prices, not at two's
    # (a hundred times higher): 402 before any work.
    before = networks.served(networks.p2)
    _error(networks.ask("m-two", networks.key_two, max_tokens=16), 402, "budget_exceeded")
    assert networks.served(networks.p2) == before
    assert networks.ask("m-one", networks.key_one, max_tokens=16).status_code == 200


def test_credits_and_receipts_are_read_per_network(networks: Networks) -> None:
    answer = networks.ask("m-two", headers={HEADER: "two"})
    assert answer.status_code == 200
    request_id = answer.json()["id"]
    headers = networks.auth(networks.admin)

    def get(path: str, **params: str) -> httpx.Response:
        return httpx.get(f"{networks.x.url}{path}", params=params, headers=headers, timeout=10)

    assert get("/v1/node/credits").json()["network_id"] == networks.one
    two = get("/v1/node/credits", network="two").json()
    assert two["network_id"] == networks.two and two["balance"] < two["initial_grant"]

    def in_two() -> bool:
        receipts = get("/v1/node/receipts", network="two").json()["data"]
        return any(receipt["request_id"] == request_id for receipt in receipts)

    _wait(in_two, "the receipt in network two")
    one = get("/v1/node/receipts", network="one").json()["data"]
    assert all(receipt["request_id"] != request_id for receipt in one)
    _error(get("/v1/node/credits", network="nowhere"), 404, "network_not_found")
