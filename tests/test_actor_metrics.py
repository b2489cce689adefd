"""The actors' metrics are among Ray's own: a real InferenceWorker on a local Ray serves two
generations, and its machine's metrics export port (what the Ray dashboard and Prometheus read)
shows its finished requests and the tokens it produced."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import ray

from actors.inference_worker import InferenceWorker
from mycellm.config import ModelSettings
from mycellm.types import GenerationRequest
from tests.local_ray import ray_session


@pytest.fixture
def local_ray() -> Iterator[None]:
    with ray_session():
        yield


def _exported(name: str) -> float | None:
    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and 'worker="worker-metrics"' in line
    ]
    return sum(values) if values else None


@pytest.mark.timeout(180)
def test_a_workers_generations_and_tokens_are_in_rays_metrics(local_ray: None) -> None:
    worker = (
        ray.remote(InferenceWorker)
        .options(num_cpus=1)
        .remote("worker-metrics", ModelSettings(context_tokens=512, threads=1, embeddings=False))
    )
    ray.get(worker.start.remote())
    for index in range(2):
        request = GenerationRequest(
            request_id=f"m-{index}", model="m", prompt="1, 2, 3,", max_tokens=12, temperature=0
        )
        result = ray.get(worker.complete.remote(request))
        assert result.usage.completion_tokens == 12
    deadline = time.monotonic() + 60
    tokens = requests = None
    while time.monotonic() < deadline:
        tokens = _exported("ray_mycellm_worker_completion_tokens_total")
        requests = _exported("ray_mycellm_worker_requests_total")
        if tokens is not None and requests is not None:
            break
        time.sleep(1)
    assert tokens == 24 and requests == 2
