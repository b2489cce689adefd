"""Run a node in the foreground: Ray up, actors and Serve up, wait for a signal, tear down cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import ray

from actors.builders import Node, build_node, cluster_address, init_ray
from actors.cluster_watch import ClusterGone, ClusterWatch
from mycellm.config import NodeSettings
from mycellm.identity.keys import NodeIdentity, load_or_create_identity

logger = logging.getLogger("mycellm")


Deploy = Callable[[Node, NodeSettings, NodeIdentity], None]


def run_node(settings: NodeSettings, deploy: Deploy) -> int:
    """Run until SIGINT/SIGTERM; ``deploy`` puts the HTTP app in front of the node's actors."""
    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_or_create_identity(data_dir, node_name=settings.node_name)
    stop = threading.Event()
    gone = False  # the cluster the node joined has stopped
    dashboard = init_ray(settings)
    # After ray.init: Ray installs its own SIGTERM handler in the driver, which aborts the process.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        node = build_node(settings)
        deploy(node, settings, identity)
        names = ", ".join(model.name for model in node.models)
        print(
            f"mycellm node {identity.peer_id[:16]} serving http://{settings.host}:{settings.port}/v1 "
            f"(QUIC :{node.quic_port}; models: {names or 'none, relaying to peers'}; data: {data_dir}"
            f"{'; Ray dashboard: http://' + dashboard if dashboard else ''})",
            flush=True,
        )
        watch = ClusterWatch(node, settings) if cluster_address(settings) else None
        while not stop.wait(settings.cluster_poll_s if watch is not None else None):
            try:
                watch.step()  # type: ignore[union-attr]
            except ClusterGone as error:  # the actors and Serve went with it: nothing to tear down
                print(f"mycellm: {error}; stopping", flush=True)
                gone = True
                return 1
            except Exception as error:  # a failed look is retried at the next; the node serves on
                logger.warning("could not look at the cluster's machines: %s", error)
        print("mycellm: shutting down", flush=True)
        node.shutdown()
    finally:
        from ray import serve

        try:
            if not gone:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
