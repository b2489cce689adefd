"""Shared fixtures: one real node (Ray, Serve, worker, SmolLM2) for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.nodes import NodeProcess

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path_factory.mktemp("node") / "data")
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        code = process.stop()
        assert code == 0, f"node exited with {code}:\n{process.log_tail()}"


@pytest.fixture(scope="session")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(node: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture
def repository_root() -> Path:
    return Path(__file__).resolve().parents[1]
