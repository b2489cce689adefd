"""Two nodes on one machine with the default Ray settings: the second finds its own dashboard port."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.nodes import NodeProcess, free_port, node_environment

pytestmark = pytest.mark.node

DASHBOARD = re.compile(r"Ray dashboard: (http://127\.0\.0\.1:(\d+))")
RELAY = {"MYCELLM_RAY_DASHBOARD": "true", "MYCELLM_MODELS": "[]"}  # no model: quicker to start


def dashboard_of(node: NodeProcess) -> tuple[str, int]:
    """The dashboard named in the node's start line (printed a moment after it turns healthy)."""
    deadline = time.monotonic() + 30
    while (found := DASHBOARD.search(node.log_path.read_text(errors="replace"))) is None:
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.2)
    return found.group(1), int(found.group(2))


def test_two_nodes_with_default_ray_settings_both_start(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "first", env=RELAY)
    second = NodeProcess(tmp_path / "second", env=RELAY)
    try:
        first.start()
        second.start()
        (first_url, first_port), (second_url, second_port) = dashboard_of(first), dashboard_of(second)
        assert first_port != second_port
        for url in (first_url, second_url):
            assert httpx.get(url, timeout=10).status_code == 200
        for node in (first, second):
            assert httpx.get(f"{node.url}/health", timeout=10).status_code == 200

        # A port chosen on purpose that is taken is one clear line naming the setting, exit 2.
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "mycellm",
                "serve",
                "--data-dir",
                str(tmp_path / "third"),
                "--port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=node_environment(RELAY | {"MYCELLM_RAY_DASHBOARD_PORT": str(first_port)}),
        )
        assert refused.returncode == 2, refused.stderr
        lines = [line for line in refused.stderr.splitlines() if line.startswith("mycellm:")]
        assert len(lines) == 1 and "ray_dashboard_port" in lines[0] and str(first_port) in lines[0]
    finally:
        second.kill()
        first.kill()
