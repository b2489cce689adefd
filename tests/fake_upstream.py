"""A small fake OpenAI-compatible /v1 server for tests, served by uvicorn on loopback in a thread.

Models named ``fail-<status>`` answer generations with that HTTP status; ``slow`` streams slowly and
records a client disconnect; ``hang`` waits before answering; ``garbage`` streams malformed JSON;
``no-usage`` streams without a usage chunk; ``no-stream`` ignores ``stream: true``; ``truncated``
ends the stream after one chunk; ``mid-error`` sends an error event after one chunk.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

API_KEY = "test-key-0123456789"
CONTEXT_TOKENS = 4096
CHAT_PIECES = ("Hello", " from", " the", " fake", " upstream", "!")
COMPLETION_PIECES = (" and", " so", " on")
TOOL_ARGUMENT_PIECES = ('{"city"', ': "Par', 'is", "unit": ', '"C"}')
MODELS = (
    "alpha",
    "beta",
    "embedder",
    "slow",
    "hang",
    "garbage",
    "truncated",
    "mid-error",
    "no-usage",
    "no-stream",
    "fail-400",
    "fail-404",
    "fail-429",
    "fail-500",
)


class FakeUpstream:
    """The server and what it saw: request bodies and client disconnects."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.disconnected = threading.Event()  # set at each disconnect; tests clear it first
        self.lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.complete, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            ]
        )
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 10.0) -> None:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-upstream", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)

    # -- endpoints ----------------------------------------------------------------------------

    def _denied(self, request: Request) -> Response | None:
        if request.headers.get("authorization") == f"Bearer {API_KEY}":
            return None
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ")
        # Echo the key back, as some real servers do, so tests can check it is redacted.
        body = {
            "error": {"message": f"Incorrect API key provided: {supplied}", "type": "invalid_request_error"}
        }
        return JSONResponse(body, status_code=401)

    async def _body(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        with self.lock:
            self.requests.append(body)
        return body

    async def list_models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        data = [{"id": model, "object": "model", "owned_by": "fake"} for model in MODELS]
        data[0]["max_model_len"] = CONTEXT_TOKENS  # vLLM reports the window; the others do not
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        body = await self._body(request)
        if failure := _failure(body["model"]):
            return failure
        prompt_tokens = sum(len(str(message.get("content", "")).split()) for message in body["messages"]) + 3
        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            events = [_chat_event(body, {"role": "assistant", "content": None})]
            events.append(
                _tool_event(
                    body, 0, {"id": "call_a", "type": "function", "function": {"name": name, "arguments": ""}}
                )
            )
            events.append(
                _tool_event(
                    body, 1, {"id": "call_b", "type": "function", "function": {"name": name, "arguments": ""}}
                )
            )
            for piece in TOOL_ARGUMENT_PIECES:
                events.append(_tool_event(body, 0, {"function": {"arguments": piece}}))
                events.append(_tool_event(body, 1, {"function": {"arguments": piece.replace("Par", "Tun")}}))
            events.append(_chat_event(body, {}, finish="tool_calls"))
            completion_tokens = 2 * len(TOOL_ARGUMENT_PIECES)
        else:
            events = [_chat_event(body, {"content": piece}) for piece in CHAT_PIECES]
            events.append(_chat_event(body, {}, finish="stop"))
            completion_tokens = len(CHAT_PIECES)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        if not body.get("stream") or body["model"] == "no-stream":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(CHAT_PIECES)}
            finish = "stop"
            if body.get("tools"):
                message = {"role": "assistant", "content": None, "tool_calls": _whole_tool_calls(body)}
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return JSONResponse(
                {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        return self._stream(request, body, events, usage)

    async def complete(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        body = await self._body(request)
        if failure := _failure(body["model"]):
            return failure
        pieces = ((body["prompt"],) if body.get("echo") else ()) + COMPLETION_PIECES
        events = [
            {"object": "text_completion", "choices": [{"index": 0, "text": p, "finish_reason": None}]}
            for p in pieces
        ]
        events.append(
            {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        )
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": len(COMPLETION_PIECES)}
        if not body.get("stream"):
            choice = {"index": 0, "text": "".join(pieces), "finish_reason": "length"}
            return JSONResponse({"object": "text_completion", "choices": [choice], "usage": usage})
        return self._stream(request, body, events, usage)

    async def embeddings(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        body = await self._body(request)
        if failure := _failure(body["model"]):
            return failure
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(item)), float(i), 0.5]}
            for i, item in enumerate(inputs)
        ]
        tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)
        # Answer out of order: clients must sort by index.
        return JSONResponse(
            {"object": "list", "data": data[::-1], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    def _stream(
        self, request: Request, body: dict[str, Any], events: list[dict[str, Any]], usage: dict[str, Any]
    ) -> Response:
        model = body["model"]

        async def lines() -> AsyncIterator[str]:
            finished = False
            try:
                if model == "hang":
                    await asyncio.sleep(5)
                if model == "garbage":
                    yield "data: {not json\n\n"
                    return
                if model in ("truncated", "mid-error"):
                    yield f"data: {json.dumps(events[0])}\n\n"
                    if model == "mid-error":
                        yield 'data: {"error": {"message": "the model is overloaded"}}\n\n'
                    return
                # About 10 s of stream for "slow": far longer than any test waits for it.
                repeats = 200 if model == "slow" else 1
                for _ in range(repeats):
                    for event in events[:-1]:
                        yield f"data: {json.dumps(event)}\n\n"
                        if model == "slow":
                            await asyncio.sleep(0.05)
                yield f"data: {json.dumps(events[-1])}\n\n"
                include_usage = (body.get("stream_options") or {}).get("include_usage")
                if include_usage and model != "no-usage":
                    yield f"data: {json.dumps({'object': 'chunk', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished and model == "slow":
                    with self.lock:
                        self.disconnects += 1
                    self.disconnected.set()

        return StreamingResponse(lines(), media_type="text/event-stream")


def _failure(model: str) -> Response | None:
    if not model.startswith("fail-"):
        return None
    status = int(model.removeprefix("fail-"))
    messages = {
        400: "Invalid 'temperature': too hot",
        404: f"The model '{model}' does not exist",
        429: "Slow down",
        500: "boom",
    }
    error = {
        "message": messages.get(status, "error"),
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }
    return JSONResponse({"error": error}, status_code=status)


def _chat_event(body: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": body["model"],
        "choices": [choice],
    }


def _tool_event(body: dict[str, Any], index: int, call: dict[str, Any]) -> dict[str, Any]:
    return _chat_event(body, {"tool_calls": [{"index": index, **call}]})


def _whole_tool_calls(body: dict[str, Any]) -> list[dict[str, Any]]:
    name = body["tools"][0]["function"]["name"]
    arguments = "".join(TOOL_ARGUMENT_PIECES)
    return [{"id": "call_a", "type": "function", "function": {"name": name, "arguments": arguments}}]


@contextmanager
def running_upstream() -> Iterator[FakeUpstream]:
    """A started fake upstream, stopped on exit (tests use it as a fixture body)."""
    fake = FakeUpstream()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
