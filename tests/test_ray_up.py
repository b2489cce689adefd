"""`ray up cluster.yaml` for real: Ray's cluster launcher sets up this machine over ssh, the head
starts Ray with token authentication and without usage stats, `mycellm serve` joins it and serves
with the API key the head's setup created; `ray down cluster.yaml` stops Ray and the node with it.

The machine is this one, behind an sshd of its own (tests/ssh_machine.py): the launcher copies the
checkout into root's home there and runs the project's own setup (from pip's cache, which the
suite's setup filled). Only the provider and auth sections, which an operator fills in, differ
from the repository's file.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.ssh_machine import SshMachine, missing_tools, start_machine

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
HTTP = "http://127.0.0.1:8420"  # the node's port in configs/node.yaml
DASHBOARD = "http://127.0.0.1:8265"
PORTS = {
    6379: socket.SOCK_STREAM,
    8265: socket.SOCK_STREAM,
    8420: socket.SOCK_STREAM,
    8421: socket.SOCK_DGRAM,
}


def _taken_ports() -> list[int]:
    taken = []
    for port, kind in PORTS.items():
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as servers bind: TIME_WAIT is no owner
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                taken.append(port)
    return taken


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SshMachine]:
    if os.geteuid() != 0:
        pytest.skip("playing a machine needs root (namespaces and an sshd)")
    if missing := missing_tools():
        pytest.fail(f"missing {', '.join(missing)}: run `bash scripts/setup.sh --dev`", pytrace=False)
    if taken := _taken_ports():
        pytest.skip(f"ports the cluster file uses are taken on this machine: {taken}")
    machine = start_machine(tmp_path / "machine")
    try:
        yield machine
    finally:
        machine.stop()


def _launcher(tmp_path: Path, machine: SshMachine) -> tuple[Path, dict[str, str]]:
    """The repository's cluster file with this machine in its provider and auth sections, and the
    environment of an operator's shell (its own home, where the Ray token is made)."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cluster["provider"].update(head_ip=machine.address, worker_ips=[])
    cluster["auth"] = {"ssh_user": "root", "ssh_private_key": str(machine.key)}
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(cluster))
    home = tmp_path / "operator"
    home.mkdir()
    environment = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    environment.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=environment, check=True, capture_output=True)
    return config, environment


def _ray(command: str, config: Path, environment: dict[str, str]) -> str:
    done = subprocess.run(
        [RAY, command, "-y", str(config)] + (["--no-config-cache"] if command == "up" else []),
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=480,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ray {command} failed:\n{output[-4000:]}"
    return output


def _wait_serving(key: str, machine: SshMachine) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{HTTP}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    log = machine.upper / "mycellm.log"
    pytest.fail(f"the node did not serve:\n{log.read_text()[-3000:] if log.exists() else 'no log'}")


@pytest.mark.node
@pytest.mark.timeout(900)
def test_ray_up_starts_a_node_that_serves_and_ray_down_stops_it(tmp_path: Path, machine: SshMachine) -> None:
    config, environment = _launcher(tmp_path, machine)
    output = _ray("up", config, environment)
    assert "Usage stats collection is disabled" in output
    keys = re.findall(r"mck_[A-Za-z0-9_-]+", output)
    assert len(keys) == 1, "the head's setup prints the one API key it created"
    _wait_serving(keys[0], machine)

    models = httpx.get(f"{HTTP}/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}).json()
    answer = httpx.post(
        f"{HTTP}/v1/chat/completions",
        headers={"Authorization": f"Bearer {keys[0]}"},
        json={
            "model": models["data"][0]["id"],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["completion_tokens"] == 8 and body["mycellm"]["route"] == "local"
    assert httpx.get(f"{HTTP}/v1/models").status_code == 401, "the API listens on every interface: keys only"
    # Ray itself takes only callers with the cluster's token.
    token = (Path(environment["HOME"]) / ".ray" / "auth_token").read_text().strip()
    assert httpx.get(f"{DASHBOARD}/api/version").status_code == 401
    authorized = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{DASHBOARD}/api/version", headers=authorized).status_code == 200
    nodes = httpx.get(f"{DASHBOARD}/api/v0/nodes", headers=authorized, timeout=30).text
    assert set(re.findall(r'"node_ip": "([^"]+)"', nodes)) == {"127.0.0.1"}, "Ray on loopback only"

    _ray("down", config, environment)
    deadline = time.monotonic() + 60  # the node notices within two looks (cluster_poll_s)
    while machine.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert machine.running() == [], "Ray and the node have stopped on the machine"
    # The node has gone too: its watch saw the GCS refuse ("has stopped; stopping"), or Ray's
    # core worker ended the driver first when its raylet died; either way nothing of it is left.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{HTTP}/v1/models", timeout=5)
