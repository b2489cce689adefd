"""Our requests to peers: each sent on its own stream, its answer streamed back, cancellable, paid for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from mycellm.config import NodeSettings
from mycellm.engines.streams import ChunkBuffer, StreamTable
from mycellm.errors import MycellmError, PeerError, ProtocolError
from mycellm.network.messages import (
    CancelMessage,
    ChunkMessage,
    DoneMessage,
    EmbeddingMessage,
    EmbedMessage,
    ErrorMessage,
    InferenceMessage,
    WireMessage,
    error_from_message,
)
from mycellm.network.registry import PeerRegistry
from mycellm.network.session import Session
from mycellm.network.stalls import StallClock, probe, receive_watching
from mycellm.network.usage_check import inflated, within_bounds
from mycellm.types import (
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    NetworkId,
    PeerId,
    RequestId,
    ToolCall,
    Usage,
)

if TYPE_CHECKING:
    from mycellm.network.quic import FrameStream, PeerLink
    from mycellm.network.settlement import NetworkTerms, Settler
    from mycellm.network.spending import Hold


logger = logging.getLogger(__name__)

MAX_BROKEN = 1024
BROKEN_TTL_S = 600.0
# A broken stream's payment, waiting: (since, link, model, hold, started_ms, settler).
_Broken = tuple[float, "PeerLink", ModelInfo, "Hold", int, "Settler"]


class _Received:
    """What an answer has sent so far: its text and tool calls, and their size in bytes."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.calls = 0

    def add(self, text: str, tool_calls: tuple[ToolCall, ...]) -> None:
        parts = [text, *(part for call in tool_calls for part in (call.name, call.arguments))]
        self.parts.extend(part for part in parts if part)
        self.size += sum(len(part.encode()) for part in parts)
        self.calls += len(tool_calls)

    def text(self) -> str:
        return "".join(self.parts)


class Forwarder:
    """Sends this node's requests to peers and keeps their answers as streams to pull from.

    ``session_of`` names the routed session of a connected peer in a request's network (PeerError
    if there is none); ``registry`` counts each answer for or against the peer; ``terms_of`` gives,
    for a network, how it prices a model (the network's tier for it, not the peer's claim) and its
    settler, if any, which admits a request before it leaves and pays for it after the answer.
    ``count_tokens``, where this node serves the model itself, counts a paid answer's prompt and
    text with the model's own tokenizer, so that the usage it signs is checked token for token.
    """

    def __init__(
        self,
        session_of: Callable[[PeerId, NetworkId | None], Session],
        registry: PeerRegistry,
        settings: NodeSettings,
        terms_of: Callable[[NetworkId | None], NetworkTerms],
        count_tokens: Callable[[GenerationRequest, str], Awaitable[Usage | None]] | None = None,
    ) -> None:
        self._session_of = session_of
        self._count_tokens = count_tokens
        self._registry = registry
        self._terms_of = terms_of
        self._outbound = StreamTable(settings.stream_interval_s)
        self._stall_floor_s = settings.stall_floor_s  # the least silence that probes the peer
        # Streams that broke after sending text: their holds, until the route that resumed them
        # says what to pay (``settle_broken``), or released after BROKEN_TTL_S.
        self._broken: OrderedDict[RequestId, _Broken] = OrderedDict()

    async def open(self, peer_id: PeerId, request: GenerationRequest, wait_s: float) -> GenerationChunk:
        """Send ``request`` to ``peer_id``; returns its first chunk (errors before output raise)."""
        await self._send(peer_id, request, streamed=True)
        chunk = await self._outbound.take(request.request_id, wait_s, first=True)
        assert chunk is not None
        return chunk

    async def pull(self, request_id: RequestId, wait_s: float) -> GenerationChunk | None:
        return await self._outbound.take(request_id, wait_s)

    def follow(self, request_id: RequestId) -> AsyncIterator[GenerationChunk]:
        return self._outbound.follow(request_id)

    async def cancel(self, request_id: RequestId) -> bool:
        return await self._outbound.cancel(request_id)

    async def complete(self, peer_id: PeerId, request: GenerationRequest) -> CompletionResult:
        await self._send(peer_id, request)
        return await self._outbound.collect(request.request_id)

    def settle_broken(self, request_id: RequestId, usage: Usage) -> None:
        """Pay a peer whose stream broke off for what the reader received of it (``usage``, as
        the route that resumed it counted): signed now, offered when the peer is back if it is not."""
        broken = self._broken.pop(request_id, None)
        if broken is not None:
            link, model, hold, started_ms, settler = broken[1:]
            settler.pay_later(link, request_id, model, usage, started_ms, hold)

    def _keep_broken(self, request_id: RequestId, broken: _Broken) -> None:
        self._broken[request_id] = broken
        while len(self._broken) > MAX_BROKEN:
            _, (_, _, _, hold, _, settler) = self._broken.popitem(last=False)
            settler.release_later(request_id, hold)

    async def _send(self, peer_id: PeerId, request: GenerationRequest, streamed: bool = False) -> None:
        """Admit (402 if this node cannot pay), send, and start reading the answer into a stream."""
        terms = self._terms_of(request.network_id)
        request = request.model_copy(update={"network_id": terms.network_id})  # the peer must know
        session = self._session_of(peer_id, terms.network_id)
        claimed = next((info for info in session.hello.models if info.name == request.model), None)
        if claimed is None:
            raise PeerError(f"peer {peer_id[:12]} does not serve {request.model}")
        model, settler = terms.priced(claimed), terms.settler
        request_id = RequestId(request.request_id)
        admission = None if settler is None else await settler.admit(request, model, peer_id)
        message = (
            InferenceMessage(request=request)
            if admission is None
            else InferenceMessage(
                request=admission.request,
                hold=admission.hold.signed,
                receipts=admission.receipts,
                releases=admission.releases,
            )
        )
        started_ms = int(time.time() * 1000)
        try:
            stream = session.link.open_stream()
            stream.send(message)
        except BaseException:
            if settler is not None and admission is not None:
                settler.release_later(request_id, admission.hold)
            raise

        sent = request if admission is None else admission.request

        async def receive(buffer: ChunkBuffer) -> None:
            try:
                usage, refused = await self._receive(session, stream, buffer, sent, admission is not None)
            except BaseException:
                if settler is not None and admission is not None:
                    if streamed and buffer.produced:  # the reader got text: paid when it resumes
                        self._keep_broken(
                            request_id,
                            (time.monotonic(), session.link, model, admission.hold, started_ms, settler),
                        )
                    else:  # nothing reached the reader: the hold ends with a release
                        settler.release_later(request_id, admission.hold)
                raise
            if settler is None or admission is None:
                return
            if refused is None:
                settler.pay_later(session.link, request_id, model, usage, started_ms, admission.hold)
                return
            # Inflated usage is never signed: the seeder is told why, and is not paid.
            logger.warning("peer %s inflated the usage of %s: %s", peer_id[:12], request_id, refused)
            self._registry.outcome(peer_id, False)
            self._registry.unpaid(peer_id)
            session.send(
                ErrorMessage(code="usage_refused", message=f"request {request_id}: {refused}"[:2000])
            )
            settler.release_later(request_id, admission.hold)

        self._outbound.start(request_id, receive)

    async def embed(self, peer_id: PeerId, request: EmbeddingRequest, timeout_s: float) -> EmbeddingResult:
        network_id = self._terms_of(request.network_id).network_id
        request = request.model_copy(update={"network_id": network_id})
        stream = self._session_of(peer_id, network_id).link.open_stream()
        try:
            stream.send(EmbedMessage(request=request))
            reply = await stream.receive(timeout_s)
            match reply:
                case EmbeddingMessage():
                    self._registry.outcome(peer_id, True)
                    return EmbeddingResult(vectors=reply.vectors, prompt_tokens=reply.prompt_tokens)
                case ErrorMessage():
                    error = error_from_message(reply, peer_id)
                case _:
                    error = PeerError(
                        f"peer {peer_id[:12]} answered an embedding with {type(reply).__name__}"
                    )
            self._registry.outcome(peer_id, not isinstance(error, PeerError))
            raise error
        finally:
            stream.end()

    async def _receive(
        self,
        session: Session,
        stream: FrameStream,
        buffer: ChunkBuffer,
        request: GenerationRequest,
        paid: bool,
    ) -> tuple[Usage, str | None]:
        """Read an answer into ``buffer``: chunks, then a done or an error. Returns the usage the
        seeder reported and, if it claims more than the answer can hold, why (``usage_check``;
        a paid answer is counted by this node's tokenizer where it has the model).

        A peer that falls silent for longer than its stream's pace allows is probed; one that does
        not answer the probe fails the answer at once (``stalls``), not at the next heartbeats."""
        peer_id, clock = session.peer_id, StallClock(self._stall_floor_s)
        received = _Received()  # text and tool calls: what the usage must fit
        try:
            while True:
                message = await self._next_frame(session, stream, clock)
                match message:
                    case ChunkMessage():
                        received.add(message.text, message.tool_calls)
                        buffer.put(GenerationChunk(text=message.text, tool_calls=message.tool_calls))
                    case DoneMessage():
                        received.add(message.text, message.tool_calls)
                        counted = await self._counted(request, received) if paid else None
                        bounds = (request, message.usage, received.size, counted, received.calls)
                        refused = inflated(*bounds)
                        if refused is not None:  # the client is shown what the answer can hold
                            message = message.model_copy(update={"usage": within_bounds(*bounds)})
                        return self._on_done(peer_id, stream, buffer, message), refused
                    case ErrorMessage():
                        raise self._on_error(peer_id, stream, message)
                    case None:
                        raise PeerError(f"peer {peer_id[:12]} ended the stream without an answer")
                    case _:
                        raise PeerError(f"peer {peer_id[:12]} sent {message.kind} inside an answer")
        except PeerError:
            self._registry.outcome(peer_id, False)
            stream.reset()
            raise
        except ProtocolError as error:
            self._registry.outcome(peer_id, False)
            stream.reset()
            raise PeerError(f"peer {peer_id[:12]} broke the protocol: {error.message}") from error
        except asyncio.CancelledError:
            with contextlib.suppress(MycellmError):
                stream.send(CancelMessage(reason="cancelled by the requester"), end=True)
            raise

    async def _counted(self, request: GenerationRequest, received: _Received) -> Usage | None:
        if self._count_tokens is None:
            return None
        try:
            return await self._count_tokens(request, (request.continuation or "") + received.text())
        except MycellmError as error:  # the bounds by bytes still hold
            logger.debug("could not count the tokens of %s: %s", request.request_id, error)
            return None

    async def _next_frame(
        self, session: Session, stream: FrameStream, clock: StallClock
    ) -> WireMessage | None:
        while True:
            timeout_s = clock.timeout_s()
            try:
                message = await receive_watching(session, stream, timeout_s)
            except TimeoutError:
                record = self._registry.get(session.peer_id)
                rtt_ms = record.rtt_ms if record is not None else None
                if await probe(session, clock.last, rtt_ms, late_s=clock.silent_for() - timeout_s):
                    continue  # alive: still working (a long prompt, a slow machine)
                silent_s = clock.silent_for()
                raise PeerError(
                    f"peer {session.peer_id[:12]} stalled: nothing for {silent_s:.1f} s, and no answer to a probe"
                ) from None
            session.heard()  # a sign of life for the peer's other answers too (before: see probe)
            clock.heard()
            return message

    def _on_done(self, peer_id: PeerId, stream: FrameStream, buffer: ChunkBuffer, done: DoneMessage) -> Usage:
        buffer.put(
            GenerationChunk(
                text=done.text, tool_calls=done.tool_calls, finish_reason=done.finish_reason, usage=done.usage
            )
        )
        self._registry.outcome(peer_id, True)
        stream.end()
        return done.usage

    def _on_error(self, peer_id: PeerId, stream: FrameStream, message: ErrorMessage) -> MycellmError:
        """The error to raise for the peer's error frame (a PeerError is counted by the caller)."""
        error = error_from_message(message, peer_id)
        if not isinstance(error, PeerError):  # the request's fault, not the peer's
            self._registry.outcome(peer_id, True)
        stream.end()
        return error

    async def reap(self, idle_timeout_s: float) -> None:
        await self._outbound.reap(idle_timeout_s)
        expired = [key for key, broken in self._broken.items() if time.monotonic() - broken[0] > BROKEN_TTL_S]
        for request_id in expired:
            _, _, _, hold, _, settler = self._broken.pop(request_id)
            settler.release_later(request_id, hold)

    async def close(self) -> None:
        await self._outbound.cancel_all()
