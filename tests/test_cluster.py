"""One node on a Ray cluster of several machines: two raylets on this machine with declared GPUs.

The head declares two GPUs, a second raylet one; `mycellm serve` joins through RAY_ADDRESS. The
node runs one InferenceWorker per GPU, each seeing exactly its own device (Ray sets
CUDA_VISIBLE_DEVICES; llama.cpp has no GPU here and runs on the CPU), its identity and database
on its own machine; a stream served on the raylet that is stopped resumes on another worker; a
raylet added later gets a worker, and one that leaves takes its worker's routes with it.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.cluster_utils import Cluster

from actors.cluster_watch import gcs_reachable
from tests.nodes import NodeProcess

NODE_ARGS = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 80 << 20}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix="mcray", dir="/tmp")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "temp_dir": temp_dir, **NODE_ARGS}
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _node(tmp_path: Path, cluster: Cluster) -> NodeProcess:
    config = tmp_path / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [{"path": "smollm2", "context_tokens": 1024, "embeddings": False}],
                "cluster_poll_s": 0.5,
                "stream_interval_s": 0.0,
            }
        )
    )
    return NodeProcess(
        tmp_path / "node", args=["--config", str(config)], env={"RAY_ADDRESS": cluster.address}
    )


def _workers(node: NodeProcess) -> list[dict[str, Any]]:
    info = httpx.get(f"{node.url}/v1/node/status", timeout=30).json()
    return [worker for worker in info["workers"] if worker.get("ready")]


def _wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout_s} s")


def _actor_machines(cluster: Cluster) -> dict[str, str]:
    table = cluster.global_state.actor_table(None)
    return {
        actor["Name"]: actor["Address"]["NodeID"]
        for actor in table.values()
        if actor["Name"] and actor["State"] == "ALIVE"
    }


def _stream(node: NodeProcess, results: list[dict[str, Any]]) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 160,
        "temperature": 0,
        "stream": True,
    }
    text, finish, route = [], None, None
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=120) as response:
        route = response.headers.get("x-mycellm-route", "").split(":", 1)[-1]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                results.append({"error": event["error"], "route": route})
                return
            choice = event["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    results.append({"text": "".join(text), "finish": finish, "route": route})


@pytest.mark.timeout(600)
def test_one_worker_per_gpu_of_every_machine_streams_survive_a_machine_and_new_ones_are_used(
    tmp_path: Path, cluster: Cluster
) -> None:
    second = cluster.add_node(num_cpus=1, num_gpus=1, **NODE_ARGS)
    node = _node(tmp_path, cluster)
    node.start(timeout_s=300)
    try:
        workers = _wait_for(lambda: len(_workers(node)) == 3 and _workers(node), 60, "three workers")
        head = cluster.head_node.node_id
        devices = sorted((worker["machine"] == head, worker["devices"]) for worker in workers)
        assert devices == [(False, "0"), (True, "0"), (True, "1")]
        assert {worker["threads"] for worker in workers} == {1}  # each its machine's CPUs, shared
        machines = _actor_machines(cluster)
        assert {machines["ledger"], machines["peer-manager"], machines["resolver"]} == {head}

        # Streams on every worker; the second machine's raylet dies while they stream.
        on_second = {w["name"] for w in workers if w["machine"] == second.node_id}
        results: list[dict[str, Any]] = []
        threads = [threading.Thread(target=_stream, args=(node, results)) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        cluster.remove_node(second, allow_graceful=False)
        for thread in threads:
            thread.join(timeout=180)
        assert len(results) == 6 and all("error" not in result for result in results), results
        assert all(result["finish"] == "length" and result["text"] for result in results)
        assert any(result["route"] in on_second for result in results), "no stream was on the second machine"
        _wait_for(lambda: len(_workers(node)) == 2, 60, "the second machine's worker withdrawn")

        # A machine that joins later gets its worker, and requests reach it.
        third = cluster.add_node(num_cpus=1, num_gpus=1, **NODE_ARGS)
        _wait_for(
            lambda: any(worker["machine"] == third.node_id for worker in _workers(node)),
            120,
            "a worker on the new machine",
        )
        answers = []
        for _ in range(3):
            threads = [threading.Thread(target=_stream, args=(node, answers)) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        new_worker = next(worker["name"] for worker in _workers(node) if worker["machine"] == third.node_id)
        assert any(answer.get("route") == new_worker for answer in answers)

    finally:
        node.kill()


def test_a_gcs_is_reachable_while_it_listens_and_not_once_it_is_gone() -> None:
    """What tells a joined node that its cluster stopped (Ray's own calls would wait forever)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert gcs_reachable(address)
    assert not gcs_reachable(address)
    assert not gcs_reachable("not an address")
