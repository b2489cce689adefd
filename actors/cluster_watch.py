"""Machines joining and leaving a node's Ray cluster: workers started on the GPUs that appear,
withdrawn with the machine that leaves.

Run by the node's driver every ``cluster_poll_s`` while it is joined to a cluster (a node's own
local Ray never gains machines). A machine that joins gets the workers ``plan_workers`` gives it;
the workers of a machine that left are withdrawn: their routes leave the Resolver and the
PeerManager, so no new request goes there, and the streams they were serving resume on the
next route as after any worker's death (``mycellm/routing/failover.py``). A cluster whose GCS no
longer answers (``ray stop``/``ray down`` on the head) ends the node: every actor went with it.
"""

from __future__ import annotations

import logging
import socket

import ray
from ray.util.placement_group import remove_placement_group

from actors.builders import Node, start_workers
from actors.placement import cluster_nodes, plan_workers
from mycellm.config import NodeSettings

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
# Looks in a row at which the cluster's GCS refused a connection before the node gives up on it.
LOST_AFTER = 2


class ClusterGone(RuntimeError):
    """The Ray cluster the node joined has stopped (its GCS refuses connections)."""


def gcs_reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the GCS at ``host:port`` accepts a connection (Ray's own calls would wait forever)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


class ClusterWatch:
    """Keeps ``node``'s workers in step with the machines of its cluster."""

    def __init__(self, node: Node, settings: NodeSettings) -> None:
        self._node = node
        self._settings = settings
        self._gcs = ray.get_runtime_context().gcs_address
        self._refused = 0

    def step(self) -> tuple[list[str], list[str]]:
        """Look once: the workers started and those withdrawn. Raises ClusterGone once the
        cluster's GCS has refused ``LOST_AFTER`` looks in a row."""
        if not gcs_reachable(self._gcs):
            self._refused += 1
            if self._refused >= LOST_AFTER:
                raise ClusterGone(f"the Ray cluster at {self._gcs} has stopped")
            return [], []
        self._refused = 0
        nodes = cluster_nodes()
        alive = {machine.node_id for machine in nodes}
        gone = [name for name, plan in self._node.plans.items() if plan.node_id not in alive]
        for name in gone:
            self._withdraw(name)
        try:
            plans = plan_workers(self._settings.model_entries, nodes, known=frozenset(self._node.workers))
        except ValueError:
            plans = []
        started: list[str] = []
        if plans:
            try:
                served = start_workers(plans, self._node, self._settings)
            except (RuntimeError, ray.exceptions.RayError) as error:
                logger.warning("could not start workers on the machines that joined: %s", error)
                for plan in plans:
                    self._withdraw(plan.name)
                served = {}
            for name, models in served.items():
                ray.get(self._node.resolver.register_worker.remote(name, models), timeout=CALL_TIMEOUT_S)
                started.append(name)
                logger.warning("a machine joined: worker %s started", name)
        if gone or started:
            self._tell_peer_manager()
        return started, gone

    def _withdraw(self, name: str) -> None:
        self._node.workers.pop(name, None)
        self._node.plans.pop(name, None)
        group = self._node.groups.pop(name, None)
        ray.get(self._node.resolver.unregister_worker.remote(name), timeout=CALL_TIMEOUT_S)
        if group is not None:
            try:
                remove_placement_group(group)
            except Exception as error:  # its machine is gone: Ray may already have dropped it
                logger.debug("placement group of %s: %s", name, error)
        logger.warning("a machine left: worker %s withdrawn", name)

    def _tell_peer_manager(self) -> None:
        if self._node.peer_manager is None:
            return
        routes = ray.get(self._node.resolver.local_routes.remote(), timeout=CALL_TIMEOUT_S)
        update = self._node.peer_manager.set_local_workers.remote(dict(self._node.workers), routes)
        ray.get(update, timeout=CALL_TIMEOUT_S)
