"""Serving peers here: the requests a peer opens streams for, and the LocalServer that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Protocol

from mycellm.engines.protocol import InferenceEngine
from mycellm.errors import ModelNotFoundError, MycellmError, PeerError, ProtocolError
from mycellm.ledger.receipts import ReceiptTerms
from mycellm.network.messages import (
    REQUEST_KINDS,
    CancelMessage,
    ChunkMessage,
    DoneMessage,
    EmbeddingMessage,
    EmbedMessage,
    InferenceMessage,
    ReceiptMessage,
    ReceiptOfferMessage,
    WireMessage,
    error_message,
)
from mycellm.types import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    NetworkId,
    PeerId,
    RequestId,
    Usage,
)

if TYPE_CHECKING:
    from mycellm.network.quic import FrameStream, PeerLink
    from mycellm.network.seeding import HoldTerms
    from mycellm.network.settlement import NetworkTerms, Settler

logger = logging.getLogger(__name__)


FIRST_FRAME_TIMEOUT_S = 10.0


class LocalServer(Protocol):
    """What a node serves to its peers: its local models, run by whatever owns them."""

    def models(self) -> list[ModelInfo]: ...

    def load(self) -> int: ...

    def generate(
        self, request: GenerationRequest, peer_id: PeerId
    ) -> AsyncGenerator[GenerationChunk, None]: ...

    async def embed(self, request: EmbeddingRequest, peer_id: PeerId) -> EmbeddingResult: ...

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        """A local engine's count of the request's prompt and of ``text`` (an answer a peer sent
        for the same model), or None where no local engine of that model has a tokenizer."""
        ...


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
        self, request: GenerationRequest, peer_id: PeerId
    ) -> AsyncGenerator[GenerationChunk, None]:
        engine = self._engine(request.model)
        self._active += 1
        try:
            async for chunk in engine.generate(request):
                yield chunk
        finally:
            self._active -= 1

    async def embed(self, request: EmbeddingRequest, peer_id: PeerId) -> EmbeddingResult:
        return await self._engine(request.model).embed(request)

    async def count_tokens(self, request: GenerationRequest, text: str) -> Usage | None:
        try:
            engine = self._engine(request.model)
        except ModelNotFoundError:
            return None
        return await engine.count_tokens(request, text)


class RequestServer:
    """Serves the streams a peer opens here: generations, embeddings, and offers of receipts.

    ``local`` runs the work; ``terms_of`` gives the terms of a request's network on a link, and
    raises NotAMemberError when the link does not serve that network: nothing of a network is
    served to a peer that did not prove its membership of it. The terms' settler, if any, checks
    that the consumer can pay before the work and countersigns its receipt after it (without one
    this node serves for free and keeps no credits). Every stream being served is a task of its
    own, cancelled by ``close``.
    """

    def __init__(
        self, local: LocalServer, terms_of: Callable[[PeerLink, NetworkId | None], NetworkTerms]
    ) -> None:
        self._local = local
        self._terms_of = terms_of
        self._serving: set[asyncio.Task[None]] = set()
        self._per_peer: dict[PeerId, int] = {}  # generations and embeddings being served, per peer
        self.peak_per_peer = 0  # the most of one peer's requests served at once since the start

    @property
    def serving(self) -> int:
        """Streams being served now."""
        return len(self._serving)

    async def serve(self, link: PeerLink, stream: FrameStream) -> None:
        """Answer the request ``stream`` opens with; errors go back as error frames."""
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            first = await stream.receive(FIRST_FRAME_TIMEOUT_S)
            if isinstance(first, InferenceMessage | EmbedMessage):
                await self._counted(link, stream, first)
            elif first is not None:
                await self._dispatch(link, stream, first)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except ProtocolError as error:
            if error.recoverable:  # the transport already answered it with an error frame
                stream.end()
            elif error.code == "unexpected":  # a well-formed frame of the wrong kind: say so
                with contextlib.suppress(MycellmError):
                    stream.send(error_message(error), end=True)
            else:
                stream.reset()
        except MycellmError as error:
            with contextlib.suppress(MycellmError):
                stream.send(error_message(error), end=True)
        finally:
            self._serving.discard(task)

    async def _counted(self, link: PeerLink, stream: FrameStream, first: WireMessage) -> None:
        """Dispatch a generation or embedding if the peer is within its cap of them, before any work."""
        held, cap = self._per_peer.get(link.peer_id, 0), link.limits.max_requests_per_peer
        if held >= cap:
            busy = ProtocolError(f"over {cap} requests of one peer at once", code="too_many_requests")
            stream.send(error_message(busy), end=True)
            return
        self._per_peer[link.peer_id] = held + 1
        self.peak_per_peer = max(self.peak_per_peer, held + 1)
        try:
            await self._dispatch(link, stream, first)
        finally:
            left = self._per_peer.pop(link.peer_id, 1) - 1
            if left > 0:
                self._per_peer[link.peer_id] = left

    async def _dispatch(self, link: PeerLink, stream: FrameStream, first: WireMessage) -> None:
        if first.kind not in REQUEST_KINDS:
            raise ProtocolError(f"a request stream cannot open with {first.kind}", code="unexpected")
        match first:
            case InferenceMessage():
                await self._generate(link, stream, first)
            case EmbedMessage():
                await self._embed(link, stream, first.request)
            case ReceiptOfferMessage():
                await self._countersign(link, stream, first)
            case _:  # declared in REQUEST_KINDS but not handled here: still answered, never dropped
                raise MycellmError(f"no handler for a {first.kind} stream")

    async def _embed(self, link: PeerLink, stream: FrameStream, request: EmbeddingRequest) -> None:
        self._terms_of(link, request.network_id)
        result = await self._local.embed(request, link.peer_id)
        stream.send(EmbeddingMessage(vectors=result.vectors, prompt_tokens=result.prompt_tokens), end=True)

    async def _countersign(self, link: PeerLink, stream: FrameStream, offer: ReceiptOfferMessage) -> None:
        settler = self._terms_of(link, NetworkId(ReceiptTerms.from_bytes(offer.terms).network_id)).settler
        if settler is None:
            raise ProtocolError("this node keeps no credits", code="unexpected")
        receipt = await settler.countersign_offer(link, offer)
        stream.send(ReceiptMessage(receipt=receipt.to_bytes()), end=True)

    async def _generate(self, link: PeerLink, stream: FrameStream, message: InferenceMessage) -> None:
        request = message.request
        terms = self._terms_of(link, request.network_id)
        local = next((info for info in self._local.models() if info.name == request.model), None)
        if local is None:
            raise ModelNotFoundError(f"The model '{request.model}' is not served by this node", param="model")
        model, settler = terms.priced(local), terms.settler
        # Checked, and what is served kept, before any work: a restart still knows what it owes.
        hold = None if settler is None else await settler.check_consumer(link.certificate, message, model)
        serving = asyncio.current_task()
        assert serving is not None
        finished = asyncio.Event()  # set once the answer is complete: a late cancel changes nothing
        watcher = asyncio.create_task(_watch_for_cancel(stream, serving, finished))
        try:
            async with contextlib.aclosing(self._local.generate(request, link.peer_id)) as chunks:
                async for chunk in chunks:
                    if chunk.is_final:
                        finished.set()
                        self._finish(link, stream, settler, RequestId(request.request_id), model, chunk, hold)
                        return
                    if chunk.text or chunk.tool_calls:
                        stream.send(ChunkMessage(text=chunk.text, tool_calls=chunk.tool_calls))
            raise PeerError("the local engine ended without a final chunk")
        finally:
            finished.set()
            watcher.cancel()

    def _finish(
        self,
        link: PeerLink,
        stream: FrameStream,
        settler: Settler | None,
        request_id: RequestId,
        model: ModelInfo,
        chunk: GenerationChunk,
        hold: HoldTerms | None,
    ) -> None:
        assert chunk.finish_reason is not None and chunk.usage is not None
        if settler is not None:
            settler.served(link, request_id, model, chunk.usage, hold)
        stream.send(
            DoneMessage(
                text=chunk.text,
                tool_calls=chunk.tool_calls,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage,
            ),
            end=True,
        )

    def close(self) -> None:
        for task in list(self._serving):
            task.cancel()


async def _watch_for_cancel(
    stream: FrameStream, serving: asyncio.Task[None], finished: asyncio.Event
) -> None:
    """Cancel ``serving`` on a cancel frame, the requester ending its side, or a lost link."""
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
    if not finished.is_set():
        serving.cancel()
