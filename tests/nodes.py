"""A real node started as a subprocess (`mycellm serve`), for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# A grammar that forbids ending before 2000 characters of text: the answer cannot stop early, so
# a test that cancels it cannot pass on a natural stop.
LONG_JSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "essay",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 2000}},
            "required": ["text"],
        },
    },
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a node under test: loopback Ray, no usage stats, no dashboard, short temp dir."""
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "MYCELLM_RAY_DASHBOARD": "false",
            "MYCELLM_NODE_NAME": "test-node",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


class NodeProcess:
    """One `mycellm serve` process on loopback, restartable on the same data directory and port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        quic_port: int | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.quic_port = quic_port or free_udp_port()
        self.args = args or []
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-node.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def quic_address(self) -> str:
        return f"127.0.0.1:{self.quic_port}"

    def start(self, timeout_s: float = 240.0) -> None:
        """Start and wait until healthy. A first start whose HTTP port was taken meanwhile (three
        Ray clusters starting at once grab many ports) tries again on another port."""
        for attempt in range(3):
            try:
                self._launch(timeout_s)
                self._started_before = True
                return
            except RuntimeError as error:
                collided = "Failed to bind" in str(error) or "Address already in use" in str(error)
                if getattr(self, "_started_before", False) or not collided or attempt == 2:
                    raise
                self.kill()
                self.port = free_port()

    def _launch(self, timeout_s: float) -> None:
        ray_temp = tempfile.mkdtemp(prefix="mcray", dir="/tmp")
        command = [
            sys.executable,
            "-m",
            "mycellm",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            *self.args,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=node_environment(
                {"MYCELLM_RAY_TEMP_DIR": ray_temp, "MYCELLM_QUIC_PORT": str(self.quic_port), **self.env}
            ),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"node not healthy within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the node's process group, then wait until its HTTP port is closed.

        Ray's processes notice their driver's death on their own, a moment later; a restart on the
        same port must wait for the old HTTP proxy to be gone.
        """
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                        return
                time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
