"""Coalescing buffers between generations and their readers: a reader takes whatever is ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from mycellm.errors import EngineError, InvalidRequestError, MycellmError, RequestCancelledError
from mycellm.types import CompletionResult, GenerationChunk, RequestId, ToolCall

logger = logging.getLogger(__name__)


class ChunkBuffer:
    """Collects GenerationChunks from one producer; ``take`` merges everything pending into one.

    One reader at a time. Tokens therefore cross process boundaries in as few objects as the
    reader's pace allows, instead of one object per token.
    """

    def __init__(self, min_interval_s: float = 0.0) -> None:
        self._min_interval_s = min_interval_s
        self._last_delivery = 0.0
        self._texts: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._final: GenerationChunk | None = None
        self._error: MycellmError | None = None
        self._ready = asyncio.Event()
        self._delivered_final = False
        self._raised_error = False
        self.produced = False  # whether any text or tool call was put

    def put(self, chunk: GenerationChunk) -> None:
        self.produced = self.produced or bool(chunk.text or chunk.tool_calls)
        if chunk.text:
            self._texts.append(chunk.text)
        self._tool_calls.extend(chunk.tool_calls)
        if chunk.is_final:
            self._final = chunk
        self._ready.set()

    def fail(self, error: MycellmError) -> None:
        self._error = error
        self._ready.set()

    @property
    def finished(self) -> bool:
        # After an error, finished only once the reader has been handed the error itself: text or
        # tool calls delivered just before it do not end the stream, or the error would be lost.
        return self._delivered_final or self._raised_error

    async def take(self, wait_s: float) -> GenerationChunk | None:
        """Everything produced since the last take; None if nothing came within ``wait_s``.

        Raises the producer's error once the text produced before it has been delivered.
        """
        if not self._pending():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout=wait_s)
            except TimeoutError:
                return None
        # Let a few more tokens gather: each delivery costs an RPC and CPU the engine needs too.
        pause = self._last_delivery + self._min_interval_s - time.monotonic()
        if pause > 0 and self._final is None and self._error is None:
            await asyncio.sleep(pause)
        self._last_delivery = time.monotonic()
        self._ready.clear()
        if not self._texts and not self._tool_calls and self._final is None and self._error is not None:
            self._raised_error = True
            raise self._error
        text = "".join(self._texts)
        self._texts.clear()
        tool_calls = tuple(self._tool_calls)
        self._tool_calls.clear()
        final, self._final = self._final, None
        if final is not None:
            self._delivered_final = True
            return GenerationChunk(
                text=text, tool_calls=tool_calls, finish_reason=final.finish_reason, usage=final.usage
            )
        if self._error is not None:
            self._ready.set()  # the error is raised on the next take
        return GenerationChunk(text=text, tool_calls=tool_calls)

    def _pending(self) -> bool:
        return bool(self._texts or self._tool_calls or self._final is not None or self._error is not None)


def merge_chunks(chunks: Sequence[GenerationChunk]) -> GenerationChunk:
    """One chunk of several in order: their text and tool calls, and the end of the last if it is final."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return GenerationChunk(
        text="".join(chunk.text for chunk in chunks),
        tool_calls=tuple(call for chunk in chunks for call in chunk.tool_calls),
        finish_reason=last.finish_reason,
        usage=last.usage,
    )


class _Entry:
    def __init__(self, task: asyncio.Task[None], buffer: ChunkBuffer) -> None:
        self.task = task
        self.buffer = buffer
        self.last_read = time.monotonic()
        self.readers = 0


class StreamTable:
    """Open generations by request id: a producer task fills each buffer, readers ``take`` from it.

    Shared by the InferenceWorker (producer: an engine) and the PeerManager (producer: a peer's
    frames). A producer that raises fails its buffer, so a reader is never left waiting.
    """

    def __init__(self, min_interval_s: float = 0.0) -> None:
        self._min_interval_s = min_interval_s
        self._entries: dict[RequestId, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def start(self, request_id: RequestId, produce: Callable[[ChunkBuffer], Awaitable[None]]) -> None:
        if request_id in self._entries:
            raise InvalidRequestError(f"request id {request_id} is already in use")
        buffer = ChunkBuffer(self._min_interval_s)
        task = asyncio.create_task(self._run(request_id, produce, buffer))
        self._entries[request_id] = _Entry(task, buffer)

    @staticmethod
    async def _run(
        request_id: RequestId, produce: Callable[[ChunkBuffer], Awaitable[None]], buffer: ChunkBuffer
    ) -> None:
        try:
            await produce(buffer)
        except asyncio.CancelledError:
            buffer.fail(RequestCancelledError(f"request {request_id} was cancelled"))
            raise
        except MycellmError as error:
            buffer.fail(error)
        except Exception as error:  # a producer bug must not leave the reader waiting forever
            logger.exception("stream %s failed", request_id)
            buffer.fail(EngineError(f"internal failure: {error}"))

    async def take(self, request_id: RequestId, wait_s: float, first: bool = False) -> GenerationChunk | None:
        """What ``request_id`` produced since the last take; None if nothing came within ``wait_s``."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise InvalidRequestError(f"no open stream {request_id}")
        entry.readers += 1
        try:
            chunk = await entry.buffer.take(wait_s)
        except MycellmError:
            self._entries.pop(request_id, None)
            raise
        except asyncio.CancelledError:
            await self.cancel(request_id)
            raise
        finally:
            entry.readers -= 1
        entry.last_read = time.monotonic()
        if entry.buffer.finished:
            self._entries.pop(request_id, None)
        if chunk is None and first:
            await self.cancel(request_id)
            raise EngineError(f"no output for {request_id} within {wait_s:.0f} s")
        return chunk

    async def follow(self, request_id: RequestId, wait_s: float = 30.0) -> AsyncIterator[GenerationChunk]:
        """Every take of ``request_id`` to its final chunk, as they come (a reader that streams
        them on, so it needs no request per delivery). Ends with the stream's error if it fails."""
        while True:
            chunk = await self.take(request_id, wait_s)
            if chunk is None:  # nothing yet: the stream is still read, so it is not idle
                continue
            yield chunk
            if chunk.is_final:
                return

    async def collect(self, request_id: RequestId) -> CompletionResult:
        """Read a stream to its end as one result."""
        texts: list[str] = []
        tool_calls: list[ToolCall] = []
        while True:
            chunk = await self.take(request_id, wait_s=3600.0)
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

    async def cancel(self, request_id: RequestId) -> bool:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        entry.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await entry.task
        return True

    async def cancel_all(self) -> None:
        for request_id in list(self._entries):
            await self.cancel(request_id)

    async def reap(self, idle_timeout_s: float) -> list[RequestId]:
        """Cancel streams nobody has read for ``idle_timeout_s`` (their reader crashed or vanished)."""
        now = time.monotonic()
        idle = [
            request_id
            for request_id, entry in self._entries.items()
            if entry.readers == 0 and now - entry.last_read > idle_timeout_s
        ]
        for request_id in idle:
            logger.warning("cancelling idle stream %s", request_id)
            await self.cancel(request_id)
        return idle
