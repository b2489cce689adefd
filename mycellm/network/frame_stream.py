"""FrameStream: one QUIC stream carrying wire frames, with what it queued for its reader counted."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from mycellm.errors import PeerError, ProtocolError
from mycellm.network.codec import encode_frame
from mycellm.network.messages import WireMessage
from mycellm.types import PeerId

if TYPE_CHECKING:
    from mycellm.network.limits import LinkLimits


class StreamLink(Protocol):
    """What a stream needs of its link (``mycellm.network.quic.PeerLink``)."""

    peer_id: PeerId
    max_frame_bytes: int

    def send_raw(self, stream_id: int, data: bytes, end: bool) -> None: ...

    def reset_stream(self, stream_id: int) -> None: ...


class FrameStream:
    """One QUIC stream carrying wire frames; ``receive`` returns None once the peer ended it."""

    def __init__(self, link: StreamLink, stream_id: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self._items: asyncio.Queue[WireMessage | BaseException | None] = asyncio.Queue()
        self._sizes: dict[int, int] = {}  # id of a queued message -> its frame's bytes
        self._queued_bytes = 0
        self._ended = False  # we sent FIN (or reset)
        self._done = False  # the peer ended it, reset it, or the link closed

    def send(self, message: WireMessage, end: bool = False) -> None:
        if self._ended:
            raise PeerError(f"stream {self.stream_id} to {self.link.peer_id[:12]} is already ended")
        self.link.send_raw(self.stream_id, encode_frame(message, self.link.max_frame_bytes), end)
        self._ended = end

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.link.send_raw(self.stream_id, b"", True)

    def reset(self) -> None:
        if not self._ended:
            self._ended = True
            self.link.reset_stream(self.stream_id)

    async def receive(self, timeout_s: float | None = None) -> WireMessage | None:
        """The next message; None when the peer ended the stream; PeerError on reset or link loss."""
        try:
            item = await asyncio.wait_for(self._items.get(), timeout=timeout_s)
        except TimeoutError as error:
            raise PeerError(f"no frame from {self.link.peer_id[:12]} within {timeout_s} s") from error
        self._queued_bytes -= self._sizes.pop(id(item), 0)
        if isinstance(item, ProtocolError) and item.recoverable:
            raise item  # already answered with an error frame; the stream goes on
        if isinstance(item, BaseException):
            self._items.put_nowait(item)  # every later receive raises too
            raise item
        if item is None:
            self._items.put_nowait(None)
        return item

    def _deliver(self, item: WireMessage | BaseException | None, size: int = 0) -> None:
        if not self._done:
            recoverable = isinstance(item, ProtocolError) and item.recoverable
            self._done = item is None or (isinstance(item, BaseException) and not recoverable)
            if size and item is not None:
                self._sizes[id(item)] = size
                self._queued_bytes += size
            self._items.put_nowait(item)

    def _overflows(self, size: int, pending: int, limits: LinkLimits) -> bool:
        """Whether one more frame of ``size`` bytes (and ``pending`` of a partial one) is over a cap."""
        return (
            self._items.qsize() >= limits.max_queued_frames_per_stream
            or self._queued_bytes + size + pending > limits.max_buffered_bytes_per_stream
        )
