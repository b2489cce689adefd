"""Coalescing buffer between a generation and its reader: the reader takes whatever is ready."""

from __future__ import annotations

import asyncio
import time

from mycellm.engines.base import GenerationChunk, ToolCall
from mycellm.errors import MycellmError


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

    def put(self, chunk: GenerationChunk) -> None:
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
