"""InferenceWorker: one per GPU (or one CPU worker); owns one engine and the streams it produces."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

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
from mycellm.errors import EngineError, InvalidRequestError, MycellmError, RequestCancelledError
from mycellm.streams import ChunkBuffer

logger = logging.getLogger(__name__)


class _Stream:
    def __init__(self, task: asyncio.Task[None], buffer: ChunkBuffer) -> None:
        self.task = task
        self.buffer = buffer
        self.last_read = time.monotonic()
        self.readers = 0


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
        self._stream_interval_s = stream_interval_s
        self._streams: dict[str, _Stream] = {}
        self._served = 0
        self._started = False
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> list[ModelInfo]:
        await self._engine.start()
        self._started = True
        self._reaper = asyncio.create_task(self._reap_idle_streams())
        return self._engine.models()

    async def stop(self) -> None:
        for request_id in list(self._streams):
            await self.cancel(request_id)
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
        stream = self._start(request)
        return await self._take(request.request_id, stream, wait_s, first=True)

    async def pull(self, request_id: str, wait_s: float = 30.0) -> GenerationChunk | None:
        """Everything produced since the last pull; None if nothing came within ``wait_s``."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise InvalidRequestError(f"no open stream {request_id}")
        return await self._take(request_id, stream, wait_s)

    async def cancel(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        stream.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream.task
        return True

    async def complete(self, request: GenerationRequest) -> CompletionResult:
        """A whole generation; cancel(request_id) ends it early with RequestCancelledError."""
        stream = self._start(request)
        texts: list[str] = []
        tool_calls = []
        while True:
            chunk = await self._take(request.request_id, stream, wait_s=3600.0)
            if chunk is None:
                continue
            texts.append(chunk.text)
            tool_calls.extend(chunk.tool_calls)
            if chunk.finish_reason is not None and chunk.usage is not None:
                return CompletionResult(
                    text="".join(texts),
                    tool_calls=tuple(tool_calls),
                    finish_reason=chunk.finish_reason,
                    usage=chunk.usage,
                )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        result = await self._engine.embed(request)
        self._served += 1
        return result

    def _start(self, request: GenerationRequest) -> _Stream:
        if not self._started:
            raise EngineError(f"worker {self._name} is not ready")
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id} is already in use")
        buffer = ChunkBuffer(self._stream_interval_s)
        task = asyncio.create_task(self._pump(request, buffer))
        stream = _Stream(task, buffer)
        self._streams[request.request_id] = stream
        return stream

    async def _pump(self, request: GenerationRequest, buffer: ChunkBuffer) -> None:
        try:
            async for chunk in self._engine.generate(request):
                buffer.put(chunk)
            self._served += 1
        except asyncio.CancelledError:
            buffer.fail(RequestCancelledError(f"request {request.request_id} was cancelled"))
            raise
        except MycellmError as error:
            buffer.fail(error)
        except Exception as error:  # an engine bug must not leave the reader waiting forever
            logger.exception("engine failed on %s", request.request_id)
            buffer.fail(EngineError(f"engine failure: {error}"))

    async def _take(
        self, request_id: str, stream: _Stream, wait_s: float, first: bool = False
    ) -> GenerationChunk | None:
        stream.readers += 1
        try:
            chunk = await stream.buffer.take(wait_s)
        except MycellmError:
            self._streams.pop(request_id, None)
            raise
        except asyncio.CancelledError:
            await self.cancel(request_id)
            raise
        finally:
            stream.readers -= 1
        stream.last_read = time.monotonic()
        if stream.buffer.finished:
            self._streams.pop(request_id, None)
        if chunk is None and first:
            await self.cancel(request_id)
            raise EngineError(f"no output for {request_id} within {wait_s:.0f} s")
        return chunk

    async def _reap_idle_streams(self) -> None:
        """Cancel streams nobody reads any more (their reader crashed or vanished)."""
        while True:
            await asyncio.sleep(min(5.0, self._idle_timeout_s))
            now = time.monotonic()
            for request_id, stream in list(self._streams.items()):
                if stream.readers == 0 and now - stream.last_read > self._idle_timeout_s:
                    logger.warning("cancelling idle stream %s", request_id)
                    await self.cancel(request_id)
