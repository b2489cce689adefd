"""Serving without Ray: failover before output, resume mid-stream, a reader that leaves, records.

The routes are real engines in this process: the bundled SmolLM2 (llama.cpp) and an
OpenAI-compatible upstream (the small local fake server) whose models fail on purpose: ``fail-500``
refuses every generation, ``truncated`` ends its stream after one chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mycellm.api.openai import ChatCompletionBody, CompletionBody
from mycellm.api.serving import MISS_REFRESH_S, ROUTE_CACHE_S, Answer, NodeServing
from mycellm.api.tally import RequestTally
from mycellm.config import ModelSettings
from mycellm.engines import build_engine
from mycellm.engines.worker import EngineStreams, InProcessTarget
from mycellm.errors import EngineError, ModelNotFoundError
from mycellm.routing.directory import RouteSnapshot
from mycellm.routing.ranking import Route
from tests.fake_upstream import API_KEY, FakeUpstream, running_upstream

SMOL = "SmolLM2-135M-Instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


class Routes:
    """Workers in this process, a route table over them, and a NodeServing that uses it."""

    def __init__(self) -> None:
        self.workers: dict[str, EngineStreams] = {}
        self.table: list[Route] = []
        self.finished: list[RequestTally] = []
        self.failed: list[str] = []

    async def add(self, name: str, settings: ModelSettings) -> None:
        worker = EngineStreams(name, build_engine(settings), idle_timeout_s=30.0)
        self.workers[name] = worker
        for model in await worker.start():
            self.table.append(Route(kind="local", target=name, model=model))

    async def route_table(self) -> RouteSnapshot:
        return RouteSnapshot(tuple(self.table))

    def serving(self) -> NodeServing:
        return NodeServing(
            node_peer_id="0" * 64,
            route_table=self.route_table,
            target_for=lambda route: InProcessTarget(self.workers[route.target]),
            on_finished=self.finished.append,
            open_wait_s=60.0,
        )

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.stop()


def broken(upstream: FakeUpstream, upstream_model: str) -> ModelSettings:
    """An upstream model that fails, exposed under the local model's name at a better tier."""
    return ModelSettings(
        backend="openai",
        base_url=upstream.base_url,
        api_key=API_KEY,
        upstream_models=(upstream_model,),
        name=SMOL,
        tier="capable",
        timeout_s=10,
    )


@pytest.fixture
async def routes() -> AsyncIterator[Routes]:
    table = Routes()
    await table.add("llama", ModelSettings(context_tokens=1024, threads=2, tier="fast"))
    yield table
    await table.close()


def chat(**fields: Any) -> ChatCompletionBody:
    values = {"model": SMOL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    return ChatCompletionBody.model_validate(values | fields)


async def events_of(answer: Answer) -> list[dict[str, Any] | str]:
    assert answer.events is not None
    events: list[dict[str, Any] | str] = []
    async for event in answer.events:
        data = event.decode().removeprefix("data: ").strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def text_of(events: list[dict[str, Any] | str], chat: bool = True) -> str:
    key = "content" if chat else "text"
    pieces = []
    for event in events:
        if isinstance(event, dict) and event.get("choices"):
            choice = event["choices"][0]
            pieces.append((choice.get("delta", {}) if chat else choice).get(key) or "")
    return "".join(pieces)


async def test_a_stream_is_served_and_recorded(routes: Routes) -> None:
    answer = await routes.serving().generate(chat(stream=True, stream_options={"include_usage": True}))
    assert answer.route.target == "llama" and answer.served_by == "0" * 64
    events = await events_of(answer)
    assert events[-1] == "[DONE]"
    first = events[0]
    assert isinstance(first, dict) and first["mycellm"]["route"] == "local"
    usage = events[-2]
    assert isinstance(usage, dict) and usage["usage"]["completion_tokens"] >= 1
    [record] = [served.to_record() for served in routes.finished]
    assert record is not None and record.outcome == "ok" and record.route_target == "llama"
    assert record.completion_tokens == usage["usage"]["completion_tokens"]


async def test_a_route_that_fails_before_output_is_replaced_by_the_next(
    routes: Routes, upstream: FakeUpstream
) -> None:
    await routes.add("broken", broken(upstream, "fail-500"))
    serving = routes.serving()
    assert [route.target for route in await serving.routes(SMOL, None, "chat")] == ["broken", "llama"]
    answer = await serving.generate(chat(stream=True))
    assert answer.route.target == "llama"
    events = await events_of(answer)
    assert events[-1] == "[DONE]" and text_of(events)
    whole = await serving.generate(chat())
    assert whole.route.target == "llama" and whole.payload is not None
    assert whole.payload["choices"][0]["message"]["content"]
    outcomes = [(served.route.target if served.route else None, served.outcome) for served in routes.finished]
    assert outcomes == [("llama", "ok"), ("llama", "ok")]


async def test_no_route_that_works_is_an_error_before_any_output(upstream: FakeUpstream) -> None:
    table = Routes()
    await table.add("broken", broken(upstream, "fail-500"))
    try:
        with pytest.raises(EngineError):
            await table.serving().generate(chat(stream=True))
        [served] = table.finished
        assert served.outcome == "engine_error" and served.first_token_at is None
    finally:
        await table.close()


async def test_a_stream_that_breaks_is_resumed_on_the_next_route(
    routes: Routes, upstream: FakeUpstream
) -> None:
    await routes.add("broken", broken(upstream, "truncated"))
    body = chat(stream=True, max_tokens=24, temperature=0, stream_options={"include_usage": True})
    answer = await routes.serving().generate(body)
    assert answer.route.target == "broken"  # it opened there, gave one chunk and died
    events = await events_of(answer)
    text = text_of(events)
    assert text.startswith("Hello")  # the broken route's one chunk, sent once
    assert not text.startswith("HelloHello")
    assert len(text) > len("Hello")
    finishes = [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices")]
    assert finishes[-1] in ("stop", "length") and finishes.count(None) == len(finishes) - 1
    assert events[-1] == "[DONE]"
    [served] = routes.finished
    assert served.outcome == "ok" and served.route is not None and served.route.target == "llama"
    usage = events[-2]
    assert isinstance(usage, dict) and usage["usage"]["completion_tokens"] == served.completion_tokens
    assert served.completion_tokens <= 24  # max_tokens bounds the whole answer, continuation included


async def test_a_stream_that_breaks_with_no_route_left_ends_with_an_error_event(
    upstream: FakeUpstream,
) -> None:
    table = Routes()
    await table.add("broken", broken(upstream, "truncated"))
    try:
        events = await events_of(await table.serving().generate(chat(stream=True)))
        assert events[-1] == "[DONE]"
        error = events[-2]
        assert isinstance(error, dict) and error["error"]["type"] == "server_error"
        assert "ended the stream" in error["error"]["message"]
        [served] = table.finished
        assert served.outcome == "engine_error"
    finally:
        await table.close()


async def test_a_reader_that_leaves_cancels_the_generation(routes: Routes) -> None:
    left = asyncio.Event()

    async def reader_left() -> bool:
        return left.is_set()

    body = CompletionBody.model_validate(
        {"model": SMOL, "prompt": COUNTING, "max_tokens": 400, "stream": True}
    )
    answer = await routes.serving().generate(body, reader_left)
    assert answer.events is not None
    received = 0
    async for _event in answer.events:
        received += 1
        if received == 3:
            left.set()  # the reader goes away; the stream notices within a check interval
    worker = routes.workers["llama"]
    for _ in range(100):
        if worker.active == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.active == 0 and worker.served == 0  # cancelled, never finished
    [served] = routes.finished
    assert served.outcome == "cancelled"
    assert received < 100  # 400 tokens were asked for; the stream stopped soon after the reader left


async def test_closing_the_events_early_cancels_the_generation(routes: Routes) -> None:
    body = CompletionBody.model_validate(
        {"model": SMOL, "prompt": COUNTING, "max_tokens": 400, "stream": True}
    )
    answer = await routes.serving().generate(body)
    assert answer.events is not None
    events = aiter(answer.events)
    await anext(events)
    await events.aclose()  # what the HTTP server does when its client disconnects
    worker = routes.workers["llama"]
    for _ in range(100):
        if worker.active == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.active == 0 and worker.served == 0
    [served] = routes.finished
    assert served.outcome == "cancelled"


async def test_fallback_fail_keeps_only_the_best_route(routes: Routes, upstream: FakeUpstream) -> None:
    await routes.add("broken", broken(upstream, "fail-500"))
    with pytest.raises(EngineError):
        await routes.serving().generate(chat(mycellm={"fallback": "fail"}))
    [served] = routes.finished
    assert served.route is not None and served.route.target == "broken" and served.outcome == "engine_error"


async def test_a_model_that_just_appeared_is_found_before_the_cached_table_expires(routes: Routes) -> None:
    serving = routes.serving()
    assert [route.target for route in await serving.routes(SMOL, None, "chat")] == ["llama"]  # cached now
    fresh = routes.table[0].model.model_copy(update={"name": "fresh"})
    routes.table.append(Route(kind="local", target="llama", model=fresh))  # a peer that just linked
    await asyncio.sleep(MISS_REFRESH_S * 1.5)
    assert MISS_REFRESH_S * 1.5 < ROUTE_CACHE_S
    assert [route.model.name for route in await serving.routes("fresh", None, "chat")] == ["fresh"]
    with pytest.raises(ModelNotFoundError):  # a model no route serves is still a 404
        await serving.routes("missing", None, "chat")
