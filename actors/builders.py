"""The one place that applies ray.remote/.options and wires a node's actors together."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from actors.inference_worker import InferenceWorker
from actors.ledger import Ledger
from actors.peer_manager import PeerManager
from actors.placement import WorkerPlan, cluster_nodes, pinned_to, placed, plan_workers
from actors.resolver import Resolver
from mycellm.config import NodeSettings
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


def cluster_address(settings: NodeSettings) -> str | None:
    """The Ray cluster this node joins (``ray_address`` or RAY_ADDRESS); None: its own local Ray."""
    return settings.ray_address or os.environ.get("RAY_ADDRESS") or None


# Ray's periodic work on a node's own machine, slowed where it costs the engine CPU and buys a
# single node nothing (bench/local_overhead.py prints what is left). The defaults: Serve's control
# loop every 0.1 s, Serve's metrics export every 0.1 s, the raylet's resource report every 0.1 s.
# Set in the environment before a Ray process starts, they reach all of them; a value already
# set wins.
QUIET_RAY = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_raylet_report_resources_period_milliseconds": "1000",
}


def quiet_local_ray() -> None:
    for name, value in QUIET_RAY.items():
        os.environ.setdefault(name, value)


def init_ray(settings: NodeSettings) -> str | None:
    """Join the cluster at ``ray_address`` (or RAY_ADDRESS), or start a local one bound to loopback.

    Returns the dashboard's address when this node started one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray lowers worker priority by default; inference workers must not lose the CPU to the proxy.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = cluster_address(settings)
    if not address:
        quiet_local_ray()
    options: dict[str, Any] = {
        "namespace": settings.ray_namespace,
        "logging_level": settings.log_level,
        "log_to_driver": settings.log_level == "DEBUG",
    }
    if address:
        ray.init(address=address, **options)
        return None
    context = ray.init(
        "local",  # never a cluster some earlier `ray start` left running on this machine
        # A node's own Ray listens on loopback only: nothing of it is reachable from the network.
        _node_ip_address="127.0.0.1",
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
    home_node_id: str = ""
    plans: dict[str, WorkerPlan] = field(default_factory=dict)  # each worker's machine and resources
    groups: dict[str, Any] = field(default_factory=dict)  # the placement groups of GPU workers

    def shutdown(self, timeout_s: float = 20.0) -> None:
        try:
            serve.delete(APP_NAME)
        except Exception as error:  # shutting down: report and go on with the rest
            logger.warning("could not delete the Serve app: %s", error)
        stops = [worker.stop.remote() for worker in self.workers.values()] + [self.ledger.stop.remote()]
        if self.peer_manager is not None:
            stops.append(self.peer_manager.stop.remote())
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)


def start_workers(plans: list[WorkerPlan], node: Node, settings: NodeSettings) -> dict[str, list[ModelInfo]]:
    """Start the planned InferenceWorkers (kept in ``node``); the models each serves."""
    pending = []
    for plan in plans:
        options, group = placed(plan)
        worker = (
            ray.remote(InferenceWorker)
            .options(name=plan.name, max_concurrency=1000, **options)
            .remote(plan.name, plan.entry, settings.stream_idle_timeout_s, settings.stream_interval_s)
        )
        node.workers[plan.name], node.plans[plan.name] = worker, plan
        if group is not None:
            node.groups[plan.name] = group
        pending.append((plan.name, worker.start.remote()))
    return {name: ray.get(started) for name, started in pending}


def build_node(settings: NodeSettings) -> Node:
    """Start the Ledger, InferenceWorkers, Resolver and PeerManager; block until they are ready.

    The HTTP side (Ray Serve) is put in front of them by ``serve_app.deploy``."""
    nodes = cluster_nodes()
    home = next(node.node_id for node in nodes if node.home)
    on_home = pinned_to(home)  # the identity and the one database stay on the driver's machine
    ledger = (
        ray.remote(Ledger)
        .options(name="ledger", num_cpus=0, **on_home)
        .remote(settings.resolved_database_url)
    )
    ray.get(ledger.start.remote())
    resolver = ray.remote(Resolver).options(name="resolver", num_cpus=0, **on_home).remote()
    node = Node(ledger=ledger, resolver=resolver, home_node_id=home)
    try:
        plans = plan_workers(settings.model_entries, nodes)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    for name, models in start_workers(plans, node, settings).items():
        node.models.extend(models)
        ray.get(resolver.register_worker.remote(name, models))

    local_routes = ray.get(resolver.local_routes.remote())
    node.peer_manager = (
        ray.remote(PeerManager)
        .options(name="peer-manager", num_cpus=0, max_concurrency=1000, **on_home)
        .remote(settings, resolver, ledger, node.workers, local_routes)
    )
    node.quic_port = ray.get(node.peer_manager.start.remote())

    return node
