"""Where a node's actors run on a Ray cluster: the pinned ones on the head, one worker per GPU.

The Ledger, the Resolver and the PeerManager hold the node's identity and its one database: they
run on the machine of the driver (``mycellm serve``, run on the head: Ray connects a driver to the
head's raylet where several share a host) only, with node affinity that is never soft, so a
cluster never gives a node a second identity or a second store. Each local engine gets one InferenceWorker per GPU of every machine
(a vLLM model spanning ``tensor_parallel_size`` GPUs gets one per that many), each in a
placement group of its own bound to its machine, so Ray gives it exactly its devices
(``CUDA_VISIBLE_DEVICES``) and its share of that machine's CPUs, which llama.cpp's threads follow.
A cluster without GPUs runs one CPU worker per local engine on the home machine, with its CPUs
shared among them. ``plan_workers`` decides (no Ray: a value in, a value out); ``placed`` turns a
plan into actor options.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from mycellm.config import ModelSettings

NODE_LABEL = "ray.io/node-id"
HEAD_RESOURCE = "node:__internal_head__"
PLACEMENT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One machine of the cluster as Ray reports it."""

    node_id: str
    cpus: float
    gpus: int
    home: bool  # the machine of this node's driver, its identity and its database


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One InferenceWorker: which engine, on which machine, with which resources."""

    name: str
    entry: ModelSettings  # with llama.cpp threads set to its CPUs unless the config set them
    node_id: str
    gpus: float  # GPUs of its placement group's bundle (0: a CPU worker, no placement group)
    cpus: float


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "model"


def _threaded(entry: ModelSettings, cpus: float) -> ModelSettings:
    if entry.backend != "llama_cpp" or entry.threads is not None:
        return entry
    return entry.model_copy(update={"threads": max(1, math.floor(cpus))})


def _gpus_per_worker(entry: ModelSettings) -> int:
    return entry.tensor_parallel_size if entry.backend == "vllm" else 1


def plan_workers(
    entries: list[ModelSettings], nodes: list[ClusterNode], known: frozenset[str] = frozenset()
) -> list[WorkerPlan]:
    """The workers ``entries`` need on ``nodes``; names in ``known`` (already running) are left out.

    Names are stable per machine, model and device slot, so planning again after a machine joins
    yields the running workers' names again and only the new machine's workers are started."""
    home = next((node for node in nodes if node.home), None)
    if home is None:
        raise ValueError("this node's own machine is not in the cluster")
    local = [entry for entry in entries if entry.backend != "openai"]
    gpu_nodes = [node for node in nodes if node.gpus > 0]
    plans: list[WorkerPlan] = []
    for index, entry in enumerate(entries):
        model = f"{index}-{_slug(entry.name or entry.path)}"
        if entry.backend == "openai":
            plans.append(WorkerPlan(f"worker-{model}", entry, home.node_id, 0, 0))
        elif not gpu_nodes:
            if entry.backend == "vllm":
                raise ValueError("the vllm backend needs a GPU and this cluster has none")
            share = max(1.0, home.cpus / len(local))
            plans.append(WorkerPlan(f"worker-{model}", _threaded(entry, share), home.node_id, 0, share))
        else:
            plans.extend(_gpu_workers(entry, model, gpu_nodes, len(local)))
    return [plan for plan in plans if plan.name not in known]


def _gpu_workers(entry: ModelSettings, model: str, nodes: list[ClusterNode], models: int) -> list[WorkerPlan]:
    """One worker per GPU (or per ``tensor_parallel_size`` GPUs) of each machine; the GPUs are
    shared by the local engines (a fraction each), and so are the machine's CPUs."""
    width = _gpus_per_worker(entry)
    plans = []
    for node in nodes:
        slots = node.gpus // width
        if slots == 0:
            continue
        cpus = max(0.5, node.cpus / (slots * models))
        gpus = width / models if width == 1 else float(width)
        for slot in range(slots):
            name = f"worker-{model}-{node.node_id[:12]}-{slot}"
            plans.append(WorkerPlan(name, _threaded(entry, cpus), node.node_id, gpus, cpus))
    return plans


def cluster_nodes() -> list[ClusterNode]:
    """The live machines of the cluster this process (the driver) is connected to."""
    home, nodes = ray.get_runtime_context().get_node_id(), []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(
            ClusterNode(
                node_id=node["NodeID"],
                cpus=float(resources.get("CPU", 0)),
                gpus=int(resources.get("GPU", 0)),
                home=node["NodeID"] == home,
            )
        )
    return nodes


def home_resource() -> str:
    """A resource only the driver's machine has, for what cannot take a scheduling strategy (the
    Serve ingress): the head's marker when the driver runs on the head (Ray gives it the head's
    raylet where several share a host), else its host's."""
    home = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == home:
            resources = node.get("Resources", {})
            return HEAD_RESOURCE if HEAD_RESOURCE in resources else f"node:{node['NodeManagerAddress']}"
    raise RuntimeError("this process's machine is not in its cluster")


def pinned_to(node_id: str) -> dict[str, Any]:
    """Actor options that run it on ``node_id`` only (it fails rather than move elsewhere)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def placed(plan: WorkerPlan) -> tuple[dict[str, Any], PlacementGroup | None]:
    """Actor options for ``plan``, and the placement group bound to its machine (a GPU worker)."""
    if plan.gpus == 0:
        return {"num_cpus": plan.cpus, **pinned_to(plan.node_id)}, None
    group = placement_group(
        [{"GPU": plan.gpus, "CPU": plan.cpus}],
        strategy="STRICT_PACK",
        name=f"mycellm-{plan.name}",
        bundle_label_selector=[{NODE_LABEL: plan.node_id}],
    )
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"no room for {plan.name} on machine {plan.node_id[:12]} within {PLACEMENT_TIMEOUT_S:.0f} s"
        )
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    return {"num_cpus": plan.cpus, "num_gpus": plan.gpus, "scheduling_strategy": strategy}, group
