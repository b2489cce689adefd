"""A node restarted on the same data directory keeps its identity and its recorded requests."""

from __future__ import annotations

import stat

import httpx
import openai
import pytest

from tests.nodes import NodeProcess

pytestmark = pytest.mark.node


def test_restart_keeps_peer_id_and_requests(
    node: NodeProcess, client: openai.OpenAI, model_name: str
) -> None:
    completion = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    before = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
    recorded: list[str] = []
    for _ in range(40):
        recorded = [
            r["request_id"] for r in httpx.get(f"{node.url}/v1/node/requests", timeout=10).json()["data"]
        ]
        if completion.id in recorded:
            break
    assert completion.id in recorded

    assert node.stop() == 0, node.log_tail()
    identity = node.data_dir / "identity"
    for name in ("account.key", "device.key", "device.cert"):
        assert stat.S_IMODE((identity / name).stat().st_mode) == 0o600
    assert (node.data_dir / "mycellm.db").is_file()

    node.start()
    after = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
    assert after["peer_id"] == before["peer_id"]
    assert after["account_id"] == before["account_id"]
    assert after["requests"]["requests"] >= before["requests"]["requests"]
    ids = [
        r["request_id"]
        for r in httpx.get(f"{node.url}/v1/node/requests", params={"limit": 1000}, timeout=10).json()["data"]
    ]
    assert completion.id in ids
    # and it serves again
    again = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert again.usage.completion_tokens >= 1
