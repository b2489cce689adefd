"""Streams read from a real InferenceWorker on a local Ray through its ``follow`` generator
(``ActorTarget.pull``): the same text and usage as a whole completion, deliveries gathered while
the reader is slow, cancellation that frees the worker, and typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from actors.inference_worker import InferenceWorker
from actors.targets import ActorTarget
from mycellm.config import ModelSettings
from mycellm.errors import InvalidRequestError
from mycellm.types import CompletionResult, GenerationChunk, GenerationRequest
from tests.local_ray import ray_session


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    with ray_session():
        handle = (
            ray.remote(InferenceWorker)
            .options(num_cpus=1)
            .remote("worker-follow", ModelSettings(context_tokens=512, threads=1, embeddings=False))
        )
        ray.get(handle.start.remote())
        yield handle


def _request(request_id: str, max_tokens: int = 40) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, model="m", prompt="Once upon a time", max_tokens=max_tokens, temperature=0
    )


async def _read(target: ActorTarget, request_id: str, pause_s: float = 0.0) -> list[GenerationChunk]:
    chunks = []
    while not chunks or not chunks[-1].is_final:
        if pause_s:
            await asyncio.sleep(pause_s)
        chunk = await target.pull(request_id, 30.0)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


async def _whole_and_followed(
    worker: Any, request_id: str, pause_s: float = 0.0
) -> tuple[CompletionResult, list[GenerationChunk]]:
    """The same request answered whole, then opened and followed to its end."""
    whole = await ActorTarget(worker, 60).complete(_request(f"whole-{request_id}"))
    target = ActorTarget(worker, 60)
    first = await target.open(_request(request_id), 60)
    return whole, [first, *await _read(target, request_id, pause_s)]


@pytest.mark.timeout(180)
def test_a_followed_stream_is_the_whole_completion_with_its_usage(worker: Any) -> None:
    async def run() -> None:
        whole, chunks = await _whole_and_followed(worker, "followed")
        assert "".join(chunk.text for chunk in chunks) == whole.text
        assert chunks[-1].usage == whole.usage and chunks[-1].finish_reason == whole.finish_reason
        assert all(not chunk.is_final for chunk in chunks[:-1])
        # Deliveries are gathered (at most one per stream_interval_s), not one per token.
        assert len(chunks) < whole.usage.completion_tokens

    asyncio.run(run())
    assert ray.get(worker.describe.remote())["active_requests"] == 0


@pytest.mark.timeout(180)
def test_a_slow_reader_gets_what_arrived_meanwhile_in_one_chunk(worker: Any) -> None:
    async def run() -> None:
        whole, chunks = await _whole_and_followed(worker, "slow", pause_s=0.4)
        assert "".join(chunk.text for chunk in chunks) == whole.text
        assert chunks[-1].usage == whole.usage
        # 40 tokens at a pause of 0.4 s per read: far fewer reads than deliveries were made.
        assert len(chunks) <= 6

    asyncio.run(run())


@pytest.mark.timeout(180)
def test_cancelling_a_followed_stream_frees_the_worker(worker: Any) -> None:
    async def run() -> None:
        target = ActorTarget(worker, 60)
        await target.open(_request("cancelled", max_tokens=400), 60)
        assert await target.pull("cancelled", 30.0) is not None
        target.cancel("cancelled")
        for _ in range(100):
            if ray.get(worker.describe.remote())["active_requests"] == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the cancelled stream is still running on the worker")

    asyncio.run(run())
    served = ray.get(worker.describe.remote())["served_requests"]
    # The worker serves the next request as before.
    result = ray.get(worker.complete.remote(_request("after-cancel", max_tokens=4)))
    assert result.usage.completion_tokens == 4
    assert ray.get(worker.describe.remote())["served_requests"] == served + 1


@pytest.mark.timeout(120)
def test_following_a_stream_that_was_never_opened_is_a_typed_error(worker: Any) -> None:
    async def run() -> None:
        with pytest.raises(InvalidRequestError, match="no open stream"):
            await ActorTarget(worker, 60).pull("never-opened", 5.0)

    asyncio.run(run())
