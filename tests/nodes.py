"""A real node started as a subprocess (`mycellm serve`), for end-to-end tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


# Ports for the servers tests start come from below the kernel's ephemeral range (32768-60999 on
# Linux) and above Ray's worker ports (10002-19999): a port handed out by ``bind(0)`` is one the
# kernel may give next to any outgoing connection, and a node restarted on "its" port then finds it
# taken by a socket of another node's Ray processes.
_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def _pick(kind: socket.SocketKind) -> int:
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def free_port() -> int:
    return _pick(socket.SOCK_STREAM)


def free_udp_port() -> int:
    return _pick(socket.SOCK_DGRAM)


def session_pids(session_id: int) -> list[int]:
    """Every live process of the session ``session_id`` (a node and all its Ray processes: Ray puts
    each worker in a process group of its own, but they stay in the node's session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


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
            # Test nodes listen on loopback: addresses learned from peers are loopback ones.
            "MYCELLM_ALLOWED_PEER_NETWORKS": '["127.0.0.0/8"]',
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

    def sigkill(self) -> None:
        """SIGKILL the node and every process of its session (its Ray workers too, as when the
        machine dies) and return at once (``kill`` then waits for it)."""
        if self.process is not None and self.process.poll() is None:
            for pid in [self.process.pid, *session_pids(self.process.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the node and its whole session, then wait until its HTTP port is closed and its
        processes are gone, so a restart on the same ports finds them free."""
        if self.process is None:
            return
        self.sigkill()
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leftover = session_pids(self.process.pid)
            for pid in leftover:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) != 0 and not leftover:
                    return
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_all(*nodes: NodeProcess) -> None:
    """Start ``nodes`` at once (each waits until healthy); the first failure is raised."""
    errors: list[BaseException] = []

    def start(node: NodeProcess) -> None:
        try:
            node.start()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
