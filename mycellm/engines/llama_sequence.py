"""One request's sequence in the llama.cpp batch: tokens still to decode, its sampler, text decoding, stops, chunks."""

from __future__ import annotations

import codecs
import threading
from collections.abc import Callable

from llama_cpp._internals import LlamaSampler

from mycellm.engines.continuation import ContinuationStopMatcher
from mycellm.engines.grammar import end_tool_call
from mycellm.engines.llama_prompts import PreparedRequest
from mycellm.errors import MycellmError
from mycellm.types import FinishReason, GenerationChunk, Usage

Emit = Callable[[GenerationChunk | MycellmError], None]


class LlamaSequence:
    """The state of one generation from admission to its last chunk.

    The scheduler thread alone calls ``accept`` and ``close`` once the sequence is submitted; the
    caller only sets ``cancelled`` (its generator closed). ``pending`` holds what the next steps
    must decode: the prompt (less the prefix a slot already holds), then each sampled token.
    """

    def __init__(
        self,
        prepared: PreparedRequest,
        sampler: LlamaSampler,
        emit: Emit,
        detokenize: Callable[[int], bytes],
        is_end: Callable[[int], bool],
    ) -> None:
        self.prepared = prepared
        self.sampler: LlamaSampler | None = sampler
        self.cancelled = threading.Event()
        self.pending: list[int] = list(prepared.tokens)
        self.prompt_left = len(prepared.tokens)  # tokens of prompt and continuation not yet decoded
        self._put = emit
        self._detokenize = detokenize
        self._is_end = is_end
        self._matcher = ContinuationStopMatcher(prepared.stops, prepared.request.continuation)
        # Invalid bytes inside the text become U+FFFD; those of a character cut by the end (limit, stop
        # or end of turn) stay pending in the decoder, which is never flushed: they are dropped.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tool_text: list[str] = []
        self.produced = 0

    def start(self) -> bool:
        """Send what comes before any token (the echo); False when the sequence already ended:
        a continuation that used the whole budget (or the context), or ends in a stop string."""
        request = self.prepared.request
        if request.echo and request.prompt is not None and not request.continuation:
            self._emit(GenerationChunk(text=request.prompt))
        if self.prepared.max_new_tokens <= 0 or self._matcher.stopped:
            self._finish("stop" if self._matcher.stopped else "length")
            return False
        return True

    def accept(self, token: int) -> bool:
        """Take a sampled token; True when the sequence is done (its last chunk sent)."""
        if self._is_end(token):
            self._finish("stop")
            return True
        self.produced += 1
        text = self._matcher.feed(self._decoder.decode(self._detokenize(token)))
        if text:
            self._send(text)
        if self._matcher.stopped:
            self._finish("stop")
            return True
        if self.produced >= self.prepared.max_new_tokens:
            self._finish("length")
            return True
        self.pending = [token]
        return False

    def fail(self, error: MycellmError) -> None:
        self._emit(error)

    def _emit(self, item: GenerationChunk | MycellmError) -> None:
        try:
            self._put(item)
        except RuntimeError:  # the caller's event loop is closed: nobody reads this generation
            self.cancelled.set()

    def close(self) -> None:
        """Free the sampler; a sequence is closed once, when it leaves the batch."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def _send(self, text: str) -> None:
        if self.prepared.forced_tool is not None:
            self._tool_text.append(text)
        else:
            self._emit(GenerationChunk(text=text))

    def _finish(self, finish: FinishReason) -> None:
        prepared = self.prepared
        tail = self._matcher.flush()
        usage = Usage(
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=prepared.continuation_tokens + self.produced,
            continuation_tokens=prepared.continuation_tokens,
        )
        if prepared.forced_tool is None:
            self._emit(GenerationChunk(text=tail, finish_reason=finish, usage=usage))
        else:
            self._emit(end_tool_call(prepared.forced_tool, "".join(self._tool_text) + tail, finish, usage))
