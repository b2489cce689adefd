"""A node that serves a local GGUF and an OpenAI-compatible upstream side by side (YAML config)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.fake_upstream import API_KEY, CHAT_PIECES, FakeUpstream, running_upstream
from tests.nodes import NodeProcess

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def mixed_node(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[NodeProcess]:
    root: Path = tmp_path_factory.mktemp("mixed")
    config = root / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"backend": "llama_cpp", "path": "smollm2", "context_tokens": 1024},
                    {
                        "backend": "openai",
                        "base_url": upstream.base_url,
                        "api_key_env": "FAKE_UPSTREAM_KEY",
                        "upstream_models": ["alpha"],
                        "tier": "capable",
                        "tags": ["remote"],
                    },
                ]
            }
        )
    )
    node = NodeProcess(root / "data", args=["--config", str(config)], env={"FAKE_UPSTREAM_KEY": API_KEY})
    node.start()
    yield node
    assert node.stop() == 0, node.log_tail()


def test_both_models_listed_and_served(mixed_node: NodeProcess, upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=f"{mixed_node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    cards = {card.id: card.model_extra["mycellm"] for card in client.models.list().data}
    assert set(cards) == {"SmolLM2-135M-Instruct", "alpha"}
    assert cards["alpha"]["backend"] == "openai"
    assert cards["SmolLM2-135M-Instruct"]["context_tokens"] == 1024

    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(CHAT_PIECES)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # "auto" prefers the higher tier; a tag requirement selects it too
    auto = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert auto.model == "alpha"
    tagged = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"mycellm": {"required_tags": ["remote"]}},
    )
    assert tagged.model == "alpha"
    local = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert local.usage.completion_tokens >= 1


def test_routing_constraint_is_422(mixed_node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=f"{mixed_node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"mycellm": {"required_tags": ["gpu"]}},
        )
    assert "gpu" in raised.value.body["message"]


def test_upstream_down_is_503_and_local_keeps_serving(
    mixed_node: NodeProcess, upstream: FakeUpstream
) -> None:
    client = openai.OpenAI(base_url=f"{mixed_node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    upstream.stop()
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503
    local = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert local.usage.completion_tokens >= 1
