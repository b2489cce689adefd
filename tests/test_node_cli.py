"""The client commands of the CLI against a real node: models, status, chat, account show."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.node


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mycellm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": "/tmp"},
    )


def test_models_and_status(node) -> None:
    models = run_cli("models", "--url", f"{node.url}/v1")
    assert models.returncode == 0, models.stderr
    assert "SmolLM2-135M-Instruct" in models.stdout and "local" in models.stdout
    status = run_cli("status", "--url", f"{node.url}/v1", "--json")
    assert status.returncode == 0, status.stderr
    peer_id = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["peer_id"]
    assert peer_id in status.stdout


def test_chat_streams_an_answer_and_obeys_commands(node) -> None:
    result = run_cli(
        "chat",
        "--url",
        f"{node.url}/v1",
        "--max-tokens",
        "12",
        stdin="/model nope\nhello\n/model auto\nhello\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "error" in result.stdout  # the unknown model is reported, the REPL goes on
    assert "tokens, first after" in result.stdout


def test_account_show_matches_the_node(node) -> None:
    shown = run_cli("account", "show", "--data-dir", str(node.data_dir))
    assert shown.returncode == 0, shown.stderr
    peer_id = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["peer_id"]
    assert f"peer id:    {peer_id}" in shown.stdout


def test_unreachable_node_is_a_clear_error() -> None:
    result = run_cli("status", "--url", "http://127.0.0.1:9/v1")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr
