"""Where a node's workers go on a cluster: one per GPU of every machine, CPUs shared, names stable."""

from __future__ import annotations

import pytest

from actors.placement import ClusterNode, plan_workers
from mycellm.config import ModelSettings

HOME = ClusterNode("a" * 56, cpus=8, gpus=2, home=True)
OTHER = ClusterNode("b" * 56, cpus=4, gpus=1, home=False)
CPU_ONLY = ClusterNode("c" * 56, cpus=16, gpus=0, home=False)
GGUF = ModelSettings()
UPSTREAM = ModelSettings(backend="openai", base_url="http://127.0.0.1:9/v1")
VLLM = ModelSettings(backend="vllm", path="org/model", tensor_parallel_size=2)


def test_one_worker_per_gpu_of_every_machine_with_its_share_of_that_machines_cpus() -> None:
    plans = plan_workers([GGUF], [HOME, OTHER, CPU_ONLY])
    assert [(plan.node_id[0], plan.gpus, plan.cpus, plan.entry.threads) for plan in plans] == [
        ("a", 1.0, 4.0, 4),
        ("a", 1.0, 4.0, 4),
        ("b", 1.0, 4.0, 4),
    ]
    assert len({plan.name for plan in plans}) == 3


def test_without_gpus_one_cpu_worker_per_engine_shares_the_home_machine() -> None:
    home = ClusterNode("h" * 56, cpus=2, gpus=0, home=True)
    plans = plan_workers([GGUF, GGUF.model_copy(update={"name": "second"}), UPSTREAM], [home, CPU_ONLY])
    assert [(plan.node_id, plan.gpus, plan.cpus, plan.entry.threads) for plan in plans] == [
        (home.node_id, 0, 1.0, 1),
        (home.node_id, 0, 1.0, 1),
        (home.node_id, 0, 0, None),  # an upstream needs neither
    ]


def test_threads_set_in_the_config_are_kept() -> None:
    (plan,) = plan_workers([GGUF.model_copy(update={"threads": 3})], [ClusterNode("h", 2, 0, True)])
    assert plan.entry.threads == 3


def test_engines_share_each_gpu_and_vllm_spans_its_tensor_parallel_size() -> None:
    four = ClusterNode("d" * 56, cpus=8, gpus=4, home=True)
    plans = plan_workers([GGUF, VLLM], [four])
    gguf = [plan for plan in plans if plan.entry.backend == "llama_cpp"]
    vllm = [plan for plan in plans if plan.entry.backend == "vllm"]
    assert len(gguf) == 4 and all(plan.gpus == 0.5 for plan in gguf)
    assert len(vllm) == 2 and all(plan.gpus == 2.0 for plan in vllm)


def test_planning_again_after_a_machine_joins_starts_only_its_workers() -> None:
    running = frozenset(plan.name for plan in plan_workers([GGUF], [HOME]))
    joined = plan_workers([GGUF], [HOME, OTHER], known=running)
    assert [plan.node_id for plan in joined] == [OTHER.node_id]


def test_vllm_on_a_cluster_without_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a GPU"):
        plan_workers([VLLM], [ClusterNode("h", 2, 0, True)])
