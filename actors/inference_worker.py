"""InferenceWorker: one per GPU (or one CPU worker); owns one engine and the streams it produces."""

from __future__ import annotations

import asyncio

from mycellm.config import ModelSettings
from mycellm.engines import build_engine
from mycellm.engines.base import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
)
from mycellm.errors import EngineError
from mycellm.streams import ChunkBuffer, StreamTable


class InferenceWorker:
    """Readers pull coalesced chunks (``open`` then ``pull``) so tokens cross Ray in few objects."""

    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        idle_timeout_s: float = 60.0,
        stream_interval_s: float = 0.02,
    ) -> None:
        self._name = name
        self._engine = build_engine(settings)
        self._idle_timeout_s = idle_timeout_s
        self._streams = StreamTable(stream_interval_s)
        self._served = 0
        self._started = False
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> list[ModelInfo]:
        await self._engine.start()
        self._started = True
        self._reaper = asyncio.create_task(self._reap_idle_streams())
        return self._engine.models()

    async def stop(self) -> None:
        await self._streams.cancel_all()
        if self._reaper is not None:
            self._reaper.cancel()
        await self._engine.close()

    async def describe(self) -> dict[str, object]:
        return {
            "name": self._name,
            "backend": self._engine.backend,
            "ready": self._started,
            "active_requests": len(self._streams),
            "served_requests": self._served,
            "models": [model.model_dump() for model in self._engine.models()] if self._started else [],
        }

    # -- streams ------------------------------------------------------------------------------

    async def open(self, request: GenerationRequest, wait_s: float = 600.0) -> GenerationChunk:
        """Start a generation and return its first chunk (errors before any output raise here)."""
        self._start(request)
        chunk = await self._streams.take(request.request_id, wait_s, first=True)
        assert chunk is not None
        return chunk

    async def pull(self, request_id: str, wait_s: float = 30.0) -> GenerationChunk | None:
        """Everything produced since the last pull; None if nothing came within ``wait_s``."""
        return await self._streams.take(request_id, wait_s)

    async def cancel(self, request_id: str) -> bool:
        return await self._streams.cancel(request_id)

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        """A whole generation; cancel(request_id) ends it early with RequestCancelledError."""
        self._start(request)
        return await self._streams.collect(request.request_id)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        result = await self._engine.embed(request)
        self._served += 1
        return result

    def _start(self, request: GenerationRequest) -> None:
        if not self._started:
            raise EngineError(f"worker {self._name} is not ready")

        async def pump(buffer: ChunkBuffer) -> None:
            async for chunk in self._engine.generate(request):
                buffer.put(chunk)
            self._served += 1

        self._streams.start(request.request_id, pump)

    async def _reap_idle_streams(self) -> None:
        """Cancel streams nobody reads any more (their reader crashed or vanished)."""
        while True:
            await asyncio.sleep(min(5.0, self._idle_timeout_s))
            await self._streams.reap(self._idle_timeout_s)
