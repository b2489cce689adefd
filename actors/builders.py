"""The one place that applies ray.remote/.options and wires a node's actors together."""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from actors.inference_worker import InferenceWorker
from actors.ledger import Ledger
from actors.peer_manager import PeerManager
from actors.resolver import Resolver
from mycellm.config import ModelSettings, NodeSettings
from mycellm.errors import ConfigError
from mycellm.types import ModelInfo

logger = logging.getLogger(__name__)

APP_NAME = "mycellm"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dashboard_port(settings: NodeSettings) -> int:
    """The Ray dashboard's port: the configured one, or a free one when the default is taken.

    Two nodes on one machine must both start with the defaults: the second gets another port
    (printed at start). A port set on purpose that is taken is a config error naming the setting.
    """
    port = settings.ray_dashboard_port
    if _port_is_free(port):
        return port
    if "ray_dashboard_port" in settings.model_fields_set:
        raise ConfigError(
            f"ray_dashboard_port: 127.0.0.1:{port} is already in use (another node or Ray cluster?); "
            "set ray_dashboard_port to a free port, or ray_dashboard: false"
        )
    free = _free_port()
    logger.warning("the Ray dashboard's default port %d is taken; using %d", port, free)
    return free


def init_ray(settings: NodeSettings) -> str | None:
    """Join the cluster at ``ray_address`` (or RAY_ADDRESS), or start a local one bound to loopback.

    Returns the dashboard's address when this node started one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray lowers worker priority by default; inference workers must not lose the CPU to the proxy.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {
        "namespace": settings.ray_namespace,
        "logging_level": settings.log_level,
        "log_to_driver": settings.log_level == "DEBUG",
    }
    if address:
        ray.init(address=address, **options)
        return None
    context = ray.init(
        include_dashboard=settings.ray_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port(settings) if settings.ray_dashboard else None,
        _temp_dir=str(settings.ray_temp_dir) if settings.ray_temp_dir else None,
        **options,
    )
    return context.dashboard_url or None


@dataclass
class Node:
    """Handles to a running node's actors."""

    ledger: Any
    resolver: Any
    peer_manager: Any = None
    quic_port: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    models: list[ModelInfo] = field(default_factory=list)

    def shutdown(self, timeout_s: float = 20.0) -> None:
        try:
            serve.delete(APP_NAME)
        except Exception as error:  # shutting down: report and go on with the rest
            logger.warning("could not delete the Serve app: %s", error)
        stops = [worker.stop.remote() for worker in self.workers.values()] + [self.ledger.stop.remote()]
        if self.peer_manager is not None:
            stops.append(self.peer_manager.stop.remote())
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "model"


def _worker_placements(entry: ModelSettings, gpus: int, local_models: int) -> list[dict[str, float]]:
    """One worker per GPU for local engines (one CPU worker without GPUs); one for upstreams."""
    if entry.backend == "openai":
        return [{"num_cpus": 0}]
    if gpus == 0:
        if entry.backend == "vllm":
            raise ValueError("the vllm backend needs a GPU and this cluster has none")
        return [{"num_cpus": 1}]
    return [{"num_cpus": 0, "num_gpus": 1.0 / local_models} for _ in range(gpus)]


def build_node(settings: NodeSettings) -> Node:
    """Start the Ledger, InferenceWorkers, Resolver and PeerManager; block until they are ready.

    The HTTP side (Ray Serve) is put in front of them by ``serve_app.deploy``."""
    ledger = ray.remote(Ledger).options(name="ledger", num_cpus=0).remote(settings.resolved_database_url)
    ray.get(ledger.start.remote())
    resolver = ray.remote(Resolver).options(name="resolver", num_cpus=0).remote()
    node = Node(ledger=ledger, resolver=resolver)

    gpus = int(ray.cluster_resources().get("GPU", 0))
    entries = settings.model_entries
    local_models = sum(1 for entry in entries if entry.backend != "openai") or 1
    pending = []
    for entry in entries:
        for placement in _worker_placements(entry, gpus, local_models):
            name = f"worker-{len(node.workers)}-{_slug(entry.name or entry.path)}"
            worker = (
                ray.remote(InferenceWorker)
                .options(name=name, max_concurrency=1000, **placement)
                .remote(name, entry, settings.stream_idle_timeout_s, settings.stream_interval_s)
            )
            node.workers[name] = worker
            pending.append((name, worker.start.remote()))
    for name, started in pending:
        models = ray.get(started)
        node.models.extend(models)
        ray.get(resolver.register_worker.remote(name, models))

    local_routes = ray.get(resolver.local_routes.remote())
    node.peer_manager = (
        ray.remote(PeerManager)
        .options(name="peer-manager", num_cpus=0, max_concurrency=1000)
        .remote(settings, resolver, ledger, node.workers, local_routes)
    )
    node.quic_port = ray.get(node.peer_manager.start.remote())

    return node
