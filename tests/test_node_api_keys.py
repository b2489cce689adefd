"""API keys on a real node that requires them: scopes, both headers, the 401 shape, lockout, requests per
minute, a budget under 100 concurrent requests, revocation by the offline CLI while it runs, and a node
bound beyond loopback without keys refusing to start (before Ray)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from mycellm.cli.app import app
from mycellm.ledger.pricing import MICRO, PriceTable
from tests.nodes import NodeProcess, node_environment

pytestmark = pytest.mark.node

PROMPT = [{"role": "user", "content": "Say hi."}]
ERROR_FIELDS = {"message", "type", "param", "code"}


def cli(data_dir: Path, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result


def create_offline(data_dir: Path, *args: str) -> dict[str, Any]:
    created: dict[str, Any] = json.loads(cli(data_dir, "keys", "create", *args, "--json").stdout)
    return created


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str]]:
    """A loopback node whose key table is not empty (so keys are required), and its admin key."""
    data_dir = tmp_path_factory.mktemp("keyed") / "data"
    admin = create_offline(data_dir, "--scope", "admin", "--scope", "read", "--name", "root")["key"]
    process = NodeProcess(data_dir)
    process.start()
    yield process, admin
    code = process.stop()
    assert code == 0, f"node exited with {code}:\n{process.log_tail()}"


def from_address(address: str) -> httpx.Client:
    """A client whose requests come from ``address`` (any of 127.0.0.0/8 reaches the node)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(node: NodeProcess, admin: str, **terms: Any) -> dict[str, Any]:
    answer = httpx.post(f"{node.url}/v1/node/keys", json=terms, headers={"X-API-Key": admin}, timeout=30)
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def keys_by_id(node: NodeProcess, admin: str) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{node.url}/v1/node/keys", headers=as_key(admin), timeout=30)
    assert answer.status_code == 200, answer.text
    return {key["id"]: key for key in answer.json()["data"]}


def error_of(answer: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) == ERROR_FIELDS
    if code is not None:
        assert error["code"] == code, error
    return error


def chat(max_tokens: int = 2, stream: bool = False) -> dict[str, Any]:
    return {"model": "auto", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def test_each_scope_opens_its_endpoints_only(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    inference = create_key(node, admin, scopes=["inference"], name="app")
    reader = create_key(node, admin, scopes=["read"])
    assert inference["key"].startswith(f"mck_{inference['id']}_") and inference["scopes"] == ["inference"]
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key=inference["key"], max_retries=0, timeout=60)
    assert client.chat.completions.create(**chat()).choices[0].message.content is not None
    streamed = list(client.chat.completions.create(**chat(stream=True)))
    assert streamed and streamed[-1].choices[0].finish_reason is not None
    assert [model.id for model in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    for path in ("/v1/node/status", "/metrics", "/v1/node/keys"):
        error_of(httpx.get(f"{node.url}{path}", headers=as_key(inference["key"])), 403, "insufficient_scope")
    read_headers = {"X-API-Key": reader["key"]}
    assert httpx.get(f"{node.url}/v1/node/status", headers=read_headers).status_code == 200
    assert "mycellm_" in httpx.get(f"{node.url}/metrics", headers=read_headers).text
    error_of(httpx.post(f"{node.url}/v1/chat/completions", json=chat(), headers=read_headers), 403)
    error_of(httpx.post(f"{node.url}/v1/node/keys", json={"scopes": ["admin"]}, headers=read_headers), 403)
    # Open to anyone: the liveness probe and the document.
    assert httpx.get(f"{node.url}/health").status_code == 200
    assert httpx.get(f"{node.url}/openapi.json").status_code == 200
    # The admin's list has every key, spending and last use, and never a secret.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = keys_by_id(node, admin)
        if listed[inference["id"]]["last_used_at"] and listed[inference["id"]]["spent_today"] > 0:
            break
        time.sleep(0.2)
    assert listed[inference["id"]]["last_used_at"] and listed[inference["id"]]["spent_today"] > 0
    assert listed[inference["id"]]["reserved"] == 0 and listed[reader["id"]]["spent_today"] == 0
    text = json.dumps(listed)
    assert inference["key"] not in text and reader["key"] not in text and '"key"' not in text


def test_missing_and_wrong_keys_get_an_openai_401(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    with from_address("127.0.0.3") as client:
        missing = client.post(f"{node.url}/v1/chat/completions", json=chat())
        error_of(missing, 401, "missing_api_key")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong_key = "mck_" + "0" * 16 + "_" + "A" * 43
        for headers in (
            as_key(wrong_key),
            {"X-API-Key": wrong_key},
            as_key("unused"),
            {"X-API-Key": admin + "x"},
        ):
            wrong = client.get(f"{node.url}/v1/models", headers=headers)
            error = error_of(wrong, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error" and wrong.headers["www-authenticate"]
        error_of(client.get(f"{node.url}/v1/node/status"), 401, "missing_api_key")
    wrong_client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong_client.models.list()


def test_a_source_that_keeps_failing_is_locked_out(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    with from_address("127.0.0.2") as client:
        statuses = [
            client.get(f"{node.url}/v1/models", headers=as_key(f"{admin[:21]}{n:043d}")).status_code
            for n in range(10)
        ]
        assert statuses == [401] * 9 + [429]
        locked = client.get(f"{node.url}/v1/node/status", headers=as_key(admin))  # a valid key, same address
        error_of(locked, 429, "too_many_failures")
        assert 1 <= int(locked.headers["retry-after"]) <= 60
    # The node saw the real source address through the Serve proxy: 127.0.0.1 is not locked.
    assert httpx.get(f"{node.url}/v1/node/status", headers=as_key(admin)).status_code == 200


def test_requests_per_minute(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    limited = create_key(node, admin, scopes=["inference"], rpm=3)
    answers = [httpx.get(f"{node.url}/v1/models", headers=as_key(limited["key"])) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    error_of(answers[3], 429, "rate_limit_exceeded")
    assert 1 <= int(answers[3].headers["retry-after"]) <= 60


def test_a_budget_holds_under_a_hundred_concurrent_requests(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    budget = 0.02  # credits: a dozen worst cases of these requests (SmolLM2 is tiny: 0.02 / 1,000 tokens)
    key = create_key(node, admin, scopes=["inference"], budget=budget)
    before = httpx.get(f"{node.url}/v1/node/status", headers=as_key(admin)).json()["requests"]["requests"]

    async def ask_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=as_key(key["key"])) as client:
            asks = [client.post(f"{node.url}/v1/chat/completions", json=chat()) for _ in range(100)]
            return list(await asyncio.gather(*asks))

    answers = asyncio.run(ask_all())
    served = [answer.json() for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert served and refused, [answer.status_code for answer in answers]
    for answer in refused:
        assert error_of(answer, 402, "budget_exceeded")["type"] == "insufficient_quota"
    prices = PriceTable()
    charged = [prices.price(body["model"], "tiny", **_tokens(body)) for body in served]
    deadline = time.monotonic() + 20
    while (state := keys_by_id(node, admin)[key["id"]])["reserved"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state["reserved"] == 0
    spent = round(state["spent_today"] * MICRO)
    assert spent == sum(charged)  # every answer settled at its real price, exactly once
    assert spent <= budget * MICRO + max(charged)  # overspend: at most one request's price (here none)
    # A refusal came before any work: nothing was served or recorded for it.
    after = httpx.get(f"{node.url}/v1/node/status", headers=as_key(admin)).json()["requests"]["requests"]
    assert after - before == len(served)


def _tokens(body: dict[str, Any]) -> dict[str, int]:
    usage = body["usage"]
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}


def test_admin_revokes_over_http_and_the_cli_revokes_offline(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    over_http = create_key(node, admin, scopes=["inference"])
    revoked = httpx.delete(f"{node.url}/v1/node/keys/{over_http['id']}", headers=as_key(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] and not revoked.json()["active"]
    error_of(httpx.delete(f"{node.url}/v1/node/keys/{'0' * 16}", headers=as_key(admin)), 404)
    error_of(httpx.delete(f"{node.url}/v1/node/keys/nothex", headers=as_key(admin)), 400)
    offline = create_offline(node.data_dir, "--scope", "inference")  # written to the running node's store
    with from_address("127.0.0.4") as client:
        error_of(
            client.get(f"{node.url}/v1/models", headers=as_key(over_http["key"])), 401, "api_key_revoked"
        )
        assert client.get(f"{node.url}/v1/models", headers=as_key(offline["key"])).status_code == 200
        cli(node.data_dir, "keys", "revoke", offline["id"])
        revoked_at = time.monotonic()
        while client.get(f"{node.url}/v1/models", headers=as_key(offline["key"])).status_code == 200:
            assert time.monotonic() - revoked_at < 3, "the revocation did not reach the running node"
            time.sleep(0.1)
        error_of(client.get(f"{node.url}/v1/models", headers=as_key(offline["key"])), 401, "api_key_revoked")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "scopes"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["everything"]}, "scopes.0"),
        ({"scopes": ["read", "read"]}, "scopes"),
        ({"scopes": ["read"], "budget": -1}, "budget"),
        ({"scopes": ["read"], "budget": "5"}, "budget"),
        ({"scopes": ["read"], "rpm": 0}, "rpm"),
        ({"scopes": ["read"], "rpm": True}, "rpm"),
        ({"scopes": ["read"], "expires_in_s": 10**9}, "expires_in_s"),
        ({"scopes": ["read"], "name": "x" * 129}, "name"),
        ({"scopes": ["read"], "secret": "mine"}, "secret"),
        (["read"], None),
    ],
)
def test_bad_key_bodies_are_a_400_and_create_nothing(
    keyed_node: tuple[NodeProcess, str], body: Any, param: str | None
) -> None:
    node, admin = keyed_node
    before = set(keys_by_id(node, admin))
    answer = httpx.post(f"{node.url}/v1/node/keys", json=body, headers=as_key(admin))
    assert error_of(answer, 400)["param"] == param
    assert set(keys_by_id(node, admin)) == before


def test_the_client_commands_present_the_key_of_the_environment(keyed_node: tuple[NodeProcess, str]) -> None:
    node, admin = keyed_node
    status = ["status", "--url", f"{node.url}/v1", "--json"]
    refused = CliRunner().invoke(app, status, env={"MYCELLM_API_KEY": ""})
    assert refused.exit_code == 1 and "401" in refused.output and "MYCELLM_API_KEY" in refused.output
    shown = CliRunner().invoke(app, status, env={"MYCELLM_API_KEY": admin})
    assert shown.exit_code == 0 and "peer_id" in shown.output


def test_a_node_open_to_the_network_without_keys_refuses_to_start(tmp_path: Path) -> None:
    ray_temp = tmp_path / "ray"
    command = [
        sys.executable,
        "-m",
        "mycellm",
        "serve",
        "--host",
        "0.0.0.0",
        "--data-dir",
        str(tmp_path / "d"),
    ]
    environment = node_environment({"MYCELLM_RAY_TEMP_DIR": str(ray_temp)})
    started = time.monotonic()
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert refused.returncode == 2, refused.stderr
    assert "mycellm keys create" in refused.stderr and "allow_anonymous: true" in refused.stderr
    assert not ray_temp.exists() and time.monotonic() - started < 30  # Ray never started
    # A revoked key is no key.
    key = create_offline(tmp_path / "d", "--scope", "inference")
    cli(tmp_path / "d", "keys", "revoke", key["id"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert again.returncode == 2 and "no active API key" in again.stderr
