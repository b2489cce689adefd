"""Reading an actor's stream as a Ray streaming generator: deliveries arrive without a call each.

A pull is a whole actor task on each side (a request, a task spec, a reply) per delivery; the
actor's ``follow`` generator reports each delivery as it is ready, and the reader only picks it
up. Deliveries that arrived while the reader was busy are merged into one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray

from actors.calls import unwrap_ray_error
from mycellm.engines.streams import merge_chunks
from mycellm.errors import EngineError
from mycellm.types import GenerationChunk


class FollowedStream:
    """The deliveries of one opened stream, through the actor method ``follow`` (``*via`` first)."""

    def __init__(self, follow_method: Any, request_id: str) -> None:
        self._items = follow_method.options(num_returns="streaming").remote(request_id)
        self._ended = False

    @property
    def ended(self) -> bool:
        """Whether the final chunk or an error has been read (nothing more will come)."""
        return self._ended

    async def next(self, wait_s: float) -> GenerationChunk | None:
        """Everything delivered since the last call; None if nothing came within ``wait_s``."""
        if self._ended:
            raise EngineError("the stream has already ended")
        # The wait gives up on the next item, not the item itself: the generator keeps it.
        try:
            first = await self._take(asyncio.wait_for(self._items.__anext__(), timeout=wait_s))
        except TimeoutError:
            return None
        chunks = [first]
        while not chunks[-1].is_final and self._items.next_ready():
            chunks.append(await self._take(self._items.__anext__()))
        if chunks[-1].is_final:
            self._ended = True
        return merge_chunks(chunks)

    async def _take(self, next_item: Any) -> GenerationChunk:
        try:
            chunk: GenerationChunk = await (await next_item)
        except StopAsyncIteration as error:
            self._ended = True
            raise EngineError("the stream ended before its final chunk") from error
        except ray.exceptions.RayError as error:
            self._ended = True
            raise unwrap_ray_error(error) from error
        return chunk

    def close(self) -> None:
        """Stop the generator on the actor's side (best effort; the stream's cancel ends it too)."""
        if not self._ended:
            self._ended = True
            with contextlib.suppress(Exception):
                ray.cancel(self._items)
