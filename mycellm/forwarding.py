"""Requests over peer links: sending ours to a peer (streamed back, cancellable) and serving a peer's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

from mycellm.engines.base import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    InferenceEngine,
    ModelInfo,
    Usage,
)
from mycellm.errors import ModelNotFoundError, MycellmError, PeerError, ProtocolError
from mycellm.streams import ChunkBuffer, StreamTable
from mycellm.wire import (
    CancelMessage,
    ChunkMessage,
    DoneMessage,
    EmbeddingMessage,
    EmbedMessage,
    ErrorMessage,
    InferenceMessage,
    ReceiptMessage,
    ReceiptOfferMessage,
    error_from_message,
    error_message,
)

if TYPE_CHECKING:
    from mycellm.peers import PeerService, Session
    from mycellm.settlement import Settler
    from mycellm.transport.quic import FrameStream

logger = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 10.0


class LocalServer(Protocol):
    """What a node serves to its peers: its local models, run by whatever owns them."""

    def models(self) -> list[ModelInfo]: ...

    def load(self) -> int: ...

    def generate(self, request: GenerationRequest, peer_id: str) -> AsyncGenerator[GenerationChunk, None]: ...

    async def embed(self, request: EmbeddingRequest, peer_id: str) -> EmbeddingResult: ...


class EngineServer:
    """A LocalServer over engines in this process (a node without Ray, benchmarks, tests)."""

    def __init__(self, engines: list[InferenceEngine]) -> None:
        self._engines = engines
        self._active = 0

    def models(self) -> list[ModelInfo]:
        return [model for engine in self._engines for model in engine.models()]

    def load(self) -> int:
        return self._active

    def _engine(self, model: str) -> InferenceEngine:
        for engine in self._engines:
            if any(info.name == model for info in engine.models()):
                return engine
        raise ModelNotFoundError(f"The model '{model}' is not served by this node", param="model")

    async def generate(
        self, request: GenerationRequest, peer_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        engine = self._engine(request.model)
        self._active += 1
        try:
            async for chunk in engine.generate(request):
                yield chunk
        finally:
            self._active -= 1

    async def embed(self, request: EmbeddingRequest, peer_id: str) -> EmbeddingResult:
        return await self._engine(request.model).embed(request)


class Forwarder:
    def __init__(
        self,
        service: PeerService,
        local: LocalServer,
        stream_interval_s: float,
        settler: Settler | None = None,
    ) -> None:
        self._service = service
        self._local = local
        self._settler = settler
        self._outbound = StreamTable(stream_interval_s)
        self._serving: set[asyncio.Task[None]] = set()

    @property
    def serving(self) -> int:
        return len(self._serving)

    # -- our requests, served by a peer --------------------------------------------------------

    async def open(self, peer_id: str, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        """Send ``request`` to ``peer_id``; returns its first chunk (errors before output raise)."""
        await self._send(peer_id, request)
        chunk = await self._outbound.take(request.request_id, wait_s, first=True)
        assert chunk is not None
        return chunk

    async def pull(self, request_id: str, wait_s: float) -> GenerationChunk | None:
        return await self._outbound.take(request_id, wait_s)

    async def cancel(self, request_id: str) -> bool:
        return await self._outbound.cancel(request_id)

    async def complete(self, peer_id: str, request: GenerationRequest) -> CompletionResult:
        await self._send(peer_id, request)
        return await self._outbound.collect(request.request_id)

    async def _send(self, peer_id: str, request: GenerationRequest) -> None:
        """Admit (402 if this node cannot pay), send, and start reading the answer into a stream."""
        session = self._service.session(peer_id)
        model = next((info for info in session.hello.models if info.name == request.model), None)
        if model is None:
            raise PeerError(f"peer {peer_id[:12]} does not serve {request.model}")
        if self._settler is not None:
            request = await self._settler.admit(request, model)
        started_ms = int(time.time() * 1000)
        stream = session.link.open_stream()
        stream.send(InferenceMessage(request=request))

        async def receive(buffer: ChunkBuffer) -> None:
            usage = await self._receive(peer_id, stream, buffer)
            if self._settler is not None and usage is not None:
                self._settler.pay_later(session.link, request.request_id, model, usage, started_ms)

        self._outbound.start(request.request_id, receive)

    async def embed(self, peer_id: str, request: EmbeddingRequest, timeout_s: float) -> EmbeddingResult:
        stream = self._service.session(peer_id).link.open_stream()
        try:
            stream.send(EmbedMessage(request=request))
            reply = await stream.receive(timeout_s)
            if isinstance(reply, EmbeddingMessage):
                self._service.registry.outcome(peer_id, True)
                return EmbeddingResult(vectors=reply.vectors, prompt_tokens=reply.prompt_tokens)
            error = (
                error_from_message(reply, peer_id)
                if isinstance(reply, ErrorMessage)
                else PeerError(f"peer {peer_id[:12]} answered an embedding with {type(reply).__name__}")
            )
            self._service.registry.outcome(peer_id, not isinstance(error, PeerError))
            raise error
        finally:
            stream.end()

    async def _receive(self, peer_id: str, stream: FrameStream, buffer: ChunkBuffer) -> Usage | None:
        registry = self._service.registry
        try:
            while True:
                message = await stream.receive()
                if isinstance(message, ChunkMessage):
                    buffer.put(GenerationChunk(text=message.text, tool_calls=message.tool_calls))
                elif isinstance(message, DoneMessage):
                    buffer.put(
                        GenerationChunk(
                            text=message.text,
                            tool_calls=message.tool_calls,
                            finish_reason=message.finish_reason,
                            usage=message.usage,
                        )
                    )
                    registry.outcome(peer_id, True)
                    stream.end()
                    return message.usage
                elif isinstance(message, ErrorMessage):
                    error = error_from_message(message, peer_id)
                    if not isinstance(error, PeerError):  # the request's fault, not the peer's
                        registry.outcome(peer_id, True)
                    stream.end()
                    raise error
                elif message is None:
                    raise PeerError(f"peer {peer_id[:12]} ended the stream without an answer")
                else:
                    raise PeerError(f"peer {peer_id[:12]} sent {message.kind} inside an answer")
        except PeerError:
            registry.outcome(peer_id, False)
            stream.reset()
            raise
        except ProtocolError as error:
            registry.outcome(peer_id, False)
            stream.reset()
            raise PeerError(f"peer {peer_id[:12]} broke the protocol: {error.message}") from error
        except asyncio.CancelledError:
            with contextlib.suppress(MycellmError):
                stream.send(CancelMessage(reason="cancelled by the requester"), end=True)
            raise

    # -- a peer's requests, served here ---------------------------------------------------------

    async def serve_stream(self, session: Session, stream: FrameStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            first = await stream.receive(FIRST_FRAME_TIMEOUT_S)
            if isinstance(first, InferenceMessage):
                await self._serve_generation(session, stream, first.request)
            elif isinstance(first, ReceiptOfferMessage):
                if self._settler is None:
                    raise ProtocolError("this node keeps no credits", code="unexpected")
                receipt = await self._settler.countersign_offer(session.link, first)
                stream.send(ReceiptMessage(receipt=receipt.to_bytes()), end=True)
            elif isinstance(first, EmbedMessage):
                result = await self._local.embed(first.request, session.peer_id)
                stream.send(
                    EmbeddingMessage(vectors=result.vectors, prompt_tokens=result.prompt_tokens), end=True
                )
            elif first is not None:
                raise ProtocolError(f"a request stream cannot open with {first.kind}", code="unexpected")
        except asyncio.CancelledError:
            stream.reset()
            raise
        except ProtocolError as error:
            if error.recoverable:  # the transport already answered it with an error frame
                stream.end()
            else:
                stream.reset()
        except MycellmError as error:
            with contextlib.suppress(MycellmError):
                stream.send(error_message(error), end=True)
        finally:
            self._serving.discard(task)

    async def _serve_generation(
        self, session: Session, stream: FrameStream, request: GenerationRequest
    ) -> None:
        peer_id = session.peer_id
        model = next((info for info in self._local.models() if info.name == request.model), None)
        if model is None:
            raise ModelNotFoundError(f"The model '{request.model}' is not served by this node", param="model")
        if self._settler is not None:
            await self._settler.check_consumer(session.link.certificate, request, model)
        finished = False
        serving = asyncio.current_task()
        assert serving is not None

        async def watch() -> None:
            # A cancel frame, the requester ending its side, or a lost link stops the generation.
            while True:
                try:
                    message = await stream.receive()
                except ProtocolError as error:
                    if error.recoverable:
                        continue  # answered by the transport
                    break
                except PeerError:
                    break
                if message is None or isinstance(message, CancelMessage):
                    break
            if not finished:
                serving.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async with contextlib.aclosing(self._local.generate(request, peer_id)) as chunks:
                async for chunk in chunks:
                    if chunk.is_final:
                        assert chunk.finish_reason is not None and chunk.usage is not None
                        finished = True
                        if self._settler is not None:
                            self._settler.served(
                                request.request_id, session.link.certificate, model, chunk.usage
                            )
                        stream.send(
                            DoneMessage(
                                text=chunk.text,
                                tool_calls=chunk.tool_calls,
                                finish_reason=chunk.finish_reason,
                                usage=chunk.usage,
                            ),
                            end=True,
                        )
                        return
                    if chunk.text or chunk.tool_calls:
                        stream.send(ChunkMessage(text=chunk.text, tool_calls=chunk.tool_calls))
            raise PeerError("the local engine ended without a final chunk")
        finally:
            finished = True
            watcher.cancel()

    async def reap(self, idle_timeout_s: float) -> None:
        await self._outbound.reap(idle_timeout_s)

    async def close(self) -> None:
        await self._outbound.cancel_all()
        for task in list(self._serving):
            task.cancel()
