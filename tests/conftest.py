"""Shared fixtures: one real node (Ray, Serve, worker, SmolLM2) and one PostgreSQL server per session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.nodes import NodeProcess
from tests.postgres import PostgresServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # Open to callers without a key even once the fuzzing of /v1/node/keys created some.
    environment = {"MYCELLM_AUTH__ALLOW_ANONYMOUS": "true"}
    process = NodeProcess(tmp_path_factory.mktemp("node") / "data", env=environment)
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


_postgres_startups: list[PostgresServer] = []


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster, started on first use; a failure to start fails the tests that use it."""
    if importlib.util.find_spec("asyncpg") is None:
        pytest.fail("asyncpg is not installed: run `bash scripts/setup.sh --dev`", pytrace=False)
    server = PostgresServer.start()
    _postgres_startups.append(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """One database shared by the whole session (use database_url for a fresh one per test)."""
    return postgres_server.url(postgres_server.create_database("mycellm_session"))


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for this test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for server in _postgres_startups:
        terminalreporter.write_line(
            f"PostgreSQL test server ({server.bin_dir}) started in {server.startup_s:.2f} s "
            f"on 127.0.0.1:{server.port}"
        )
