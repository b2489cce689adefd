"""InferenceWorker: one per GPU (or one CPU worker); a Ray shell around one engine's EngineStreams.

Contract: it owns one engine and the streams of the generations it runs. The ingress and the
PeerManager call it (open, then follow or pull; cancel/complete/embed by request id; count_tokens to check a
seeder's usage); ``cancel`` of an unknown or finished id is a no-op, and ``stop`` may be called
more than once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import ray

from actors.actor_metrics import WorkerMetrics
from mycellm.config import ModelSettings
from mycellm.engines import build_engine
from mycellm.engines.worker import EngineStreams
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Usage,
)


class InferenceWorker:
    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        idle_timeout_s: float = 60.0,
        stream_interval_s: float = 0.05,
    ) -> None:
        self._settings = settings
        self._metrics = WorkerMetrics(name)
        self._streams = EngineStreams(name, build_engine(settings), idle_timeout_s, stream_interval_s)

    async def start(self) -> list[ModelInfo]:
        return await self._streams.start()

    async def stop(self) -> None:
        await self._streams.stop()

    async def describe(self) -> dict[str, object]:
        streams = self._streams
        return {
            "name": streams.name,
            "backend": streams.engine.backend,
            "ready": streams.started,
            "active_requests": streams.active,
            "served_requests": streams.served,
            "models": [model.model_dump() for model in streams.engine.models()] if streams.started else [],
            "machine": ray.get_runtime_context().get_node_id(),
            "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # set by Ray: exactly this worker's GPUs
            "threads": self._settings.threads,
        }

    async def open(self, request: GenerationRequest, wait_s: float = 600.0) -> GenerationChunk:
        chunk = await self._streams.open(request, wait_s)
        self._metrics.running(self._streams.active)
        self._metrics.saw(chunk)
        return chunk

    async def pull(self, request_id: str, wait_s: float = 30.0) -> GenerationChunk | None:
        chunk = await self._streams.pull(request_id, wait_s)
        if chunk is not None and chunk.finish_reason is not None:
            self._metrics.saw(chunk)
            self._metrics.running(self._streams.active)
        return chunk

    async def follow(self, request_id: str) -> AsyncIterator[GenerationChunk]:
        """The rest of an opened stream, one Ray streaming-generator item per delivery: the reader
        makes no call per delivery (a pull is a whole actor task on each side)."""
        async for chunk in self._streams.follow(request_id):
            if chunk.is_final:
                self._metrics.saw(chunk)
                self._metrics.running(self._streams.active)
            yield chunk

    async def cancel(self, request_id: str) -> bool:
        cancelled = await self._streams.cancel(request_id)
        self._metrics.running(self._streams.active)
        return cancelled

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        result = await self._streams.complete(request)
        self._metrics.completed(result)
        return result

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._streams.embed(request)

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """The engine's own count of a request's prompt and an answer's text (None if it has none)."""
        if not self._streams.started:
            return None
        return await self._streams.engine.count_tokens(request, text)
