"""mycellm's metrics among Ray's own, from the actors: the Ray dashboard's Metrics view shows them,
and each machine's metrics export port serves them to Prometheus (as ``ray_mycellm_*``).

The ingress keeps its own Prometheus endpoint (``/metrics``, ``mycellm/api/metrics.py``); these
are what only the actors see: each worker's generations and tokens, the node's peer links.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

from mycellm.types import CompletionResult, FinishReason, GenerationChunk, Usage


class WorkerMetrics:
    """One InferenceWorker's generations: running now, finished (by finish reason), tokens."""

    def __init__(self, worker: str) -> None:
        self._tags = {"worker": worker}
        self._active = Gauge(
            "mycellm_worker_active_requests", "Generations running on this worker", tag_keys=("worker",)
        )
        self._finished = Counter(
            "mycellm_worker_requests", "Generations finished, by finish reason", tag_keys=("worker", "finish")
        )
        self._prompt = Counter("mycellm_worker_prompt_tokens", "Prompt tokens read", tag_keys=("worker",))
        self._completion = Counter(
            "mycellm_worker_completion_tokens", "Completion tokens produced", tag_keys=("worker",)
        )

    def running(self, active: int) -> None:
        self._active.set(active, tags=self._tags)

    def saw(self, chunk: GenerationChunk | None) -> None:
        """A chunk handed out: the final one counts its generation."""
        if chunk is not None and chunk.finish_reason is not None and chunk.usage is not None:
            self._count(chunk.finish_reason, chunk.usage)

    def completed(self, result: CompletionResult) -> None:
        self._count(result.finish_reason, result.usage)

    def _count(self, finish: FinishReason, usage: Usage) -> None:
        self._finished.inc(1, tags={**self._tags, "finish": finish})
        if usage.prompt_tokens:
            self._prompt.inc(usage.prompt_tokens, tags=self._tags)
        produced = usage.completion_tokens - usage.continuation_tokens
        if produced > 0:
            self._completion.inc(produced, tags=self._tags)


class LinkMetrics:
    """The node's peer links, as the PeerManager sees them."""

    def __init__(self) -> None:
        self._links = Gauge("mycellm_peer_links", "Peers linked to this node", tag_keys=("direction",))

    def set(self, inbound: int, outbound: int) -> None:
        self._links.set(inbound, tags={"direction": "inbound"})
        self._links.set(outbound, tags={"direction": "outbound"})
