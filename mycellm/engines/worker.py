"""EngineStreams: one engine and the coalesced streams it produces, opened, pulled and cancelled by id.

Ray-free: the InferenceWorker actor is a thin shell around one; in-process nodes, tests and
benchmarks use it directly (``InProcessTarget`` makes it a route target).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mycellm.engines.protocol import InferenceEngine
from mycellm.engines.streams import ChunkBuffer, StreamTable
from mycellm.errors import EngineError
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    RequestId,
    Usage,
)


class EngineStreams:
    """Readers pull coalesced chunks (``open`` then ``pull``), so tokens cross a boundary in few objects."""

    def __init__(
        self,
        name: str,
        engine: InferenceEngine,
        idle_timeout_s: float = 60.0,
        stream_interval_s: float = 0.05,
    ) -> None:
        self.name = name
        self.engine = engine
        self._idle_timeout_s = idle_timeout_s
        self._streams = StreamTable(stream_interval_s)
        self.served = 0
        self.started = False
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> list[ModelInfo]:
        await self.engine.start()
        self.started = True
        self._reaper = asyncio.create_task(self._reap_idle_streams())
        return self.engine.models()

    async def stop(self) -> None:
        await self._streams.cancel_all()
        if self._reaper is not None:
            self._reaper.cancel()
        await self.engine.close()

    @property
    def active(self) -> int:
        return len(self._streams)

    async def open(self, request: GenerationRequest, wait_s: float = 600.0) -> GenerationChunk:
        """Start a generation and return its first chunk (errors before any output raise here)."""
        self._start(request)
        chunk = await self._streams.take(request.request_id, wait_s, first=True)
        assert chunk is not None
        return chunk

    async def pull(self, request_id: RequestId, wait_s: float = 30.0) -> GenerationChunk | None:
        """Everything produced since the last pull; None if nothing came within ``wait_s``."""
        return await self._streams.take(request_id, wait_s)

    def follow(self, request_id: RequestId) -> AsyncIterator[GenerationChunk]:
        """The rest of an opened stream, each delivery as it is ready, to its final chunk."""
        return self._streams.follow(request_id)

    async def cancel(self, request_id: RequestId) -> bool:
        return await self._streams.cancel(request_id)

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        """A whole generation; cancel(request_id) ends it early with RequestCancelledError."""
        self._start(request)
        return await self._streams.collect(request.request_id)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        result = await self.engine.embed(request)
        self.served += 1
        return result

    def _start(self, request: GenerationRequest) -> None:
        if not self.started:
            raise EngineError(f"worker {self.name} is not ready")

        async def pump(buffer: ChunkBuffer) -> None:
            async for chunk in self.engine.generate(request):
                buffer.put(chunk)
            self.served += 1

        self._streams.start(request.request_id, pump)

    async def _reap_idle_streams(self) -> None:
        """Cancel streams nobody reads any more (their reader crashed or vanished)."""
        while True:
            await asyncio.sleep(min(5.0, self._idle_timeout_s))
            await self._streams.reap(self._idle_timeout_s)


class InProcessTarget:
    """A route target over EngineStreams in this process (a RouteTarget of routing.failover)."""

    def __init__(self, streams: EngineStreams) -> None:
        self._streams = streams
        self._cancels: set[asyncio.Task[bool]] = set()

    async def open(self, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        return await self._streams.open(request, wait_s)

    async def pull(self, request_id: RequestId, wait_s: float) -> GenerationChunk | None:
        return await self._streams.pull(request_id, wait_s)

    def cancel(self, request_id: RequestId) -> None:
        # Kept until done: a task nobody holds may be collected before it runs.
        task = asyncio.get_running_loop().create_task(self._streams.cancel(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    def settle_broken(self, request_id: RequestId, usage: Usage) -> None:
        """Nothing to pay: the engines of this process are this node's own."""

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        return await self._streams.complete(request)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._streams.embed(request)
