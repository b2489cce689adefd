"""Continuous batching on one llama.cpp context: the thread that owns it, admits requests and decodes every sequence together."""

from __future__ import annotations

import logging
import threading
from collections import deque

import llama_cpp
from llama_cpp._internals import LlamaBatch, LlamaContext

from mycellm.engines.llama_sequence import LlamaSequence
from mycellm.engines.llama_slots import Slot, SlotTable
from mycellm.errors import EngineError

logger = logging.getLogger(__name__)

# One step's work for one slot: the tokens it puts in the batch, and the batch row of the
# token whose logits it samples next (None while its prompt is still being prefilled).
_Entry = tuple[Slot, list[int], int | None]


class BatchScheduler:
    """The one thread that touches a llama.cpp context with ``parallel`` sequences.

    Between steps it drops the sequences their callers cancelled and admits waiting requests into
    free slots. Each step decodes the next token of every decoding sequence in one batch, and as
    much of the prompts being prefilled as ``step_tokens`` leaves (a long prompt is prefilled in
    chunks while the others go on decoding), and samples every sequence from its own row with its
    own sampler. With nothing to do the thread sleeps on a condition.
    """

    def __init__(self, context: LlamaContext, parallel: int, step_tokens: int, chunk_tokens: int) -> None:
        """``step_tokens`` (at least ``parallel`` + 3, so that a prompt chunk of 2 or more tokens always
        fits beside the decoding sequences) bounds a step; ``chunk_tokens`` (at most the context's
        micro-batch, at least 3) bounds a prompt chunk, so llama.cpp never cuts one."""
        self._context = context
        self._slots = SlotTable(context.memory, parallel)
        self._step_tokens = step_tokens
        self._chunk_tokens = chunk_tokens
        self._batch = LlamaBatch(n_tokens=max(step_tokens, chunk_tokens), embd=0, n_seq_max=1, verbose=False)
        self._waiting: deque[LlamaSequence] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self.prompt_tokens_decoded = 0  # prompt tokens actually decoded (a reused prefix is not)
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    def submit(self, sequence: LlamaSequence) -> None:
        with self._condition:
            if self._closed:
                raise EngineError("the llama.cpp engine is closed")
            self._waiting.append(sequence)
            self._condition.notify()

    def wake(self) -> None:
        """Look at cancellations now (a cancelled sequence's slot goes to a waiting request)."""
        with self._condition:
            self._condition.notify()

    def close(self) -> None:
        """Stop the thread after its current step; requests still running end with an error."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()
        self._fail_all(EngineError("the llama.cpp engine was closed"))
        with self._condition:
            waiting, self._waiting = list(self._waiting), deque()
        for sequence in waiting:
            sequence.fail(EngineError("the llama.cpp engine was closed"))
            sequence.close()
        self._batch.close()

    def _run(self) -> None:
        while self._wait_for_work():
            try:
                self._step()
            except Exception as error:  # the supervisor loop: fail this step's requests, go on
                logger.exception("llama.cpp batch step failed")
                self._fail_all(EngineError(f"llama.cpp generation failed: {error}"))

    def _wait_for_work(self) -> bool:
        """Between steps: drop cancelled sequences, admit waiting ones; sleep while there is none."""
        with self._condition:
            while not self._closed:
                for slot in self._slots.active():
                    assert slot.sequence is not None
                    if slot.sequence.cancelled.is_set():
                        self._slots.release(slot)
                self._admit()
                if self._slots.active():
                    return True
                self._condition.wait()
            return False

    def _admit(self) -> None:
        """Waiting requests take the free slots in order; those cancelled while waiting are dropped."""
        if any(sequence.cancelled.is_set() for sequence in self._waiting):
            for sequence in self._waiting:
                if sequence.cancelled.is_set():
                    sequence.close()
            # Closed ones have no sampler left (a cancel that comes meanwhile waits for the next look).
            self._waiting = deque(sequence for sequence in self._waiting if sequence.sampler is not None)
        while self._waiting and self._slots.has_free():
            self._slots.admit(self._waiting.popleft())

    def _step(self) -> None:
        """One call for the next token of every decoding sequence, then one per prompt chunk.

        The calls are apart because llama.cpp computes a micro-batch that holds one
        token per sequence (a decode) by other kernels than one that holds several (a prompt), and
        the two differ in the last bits. A batch that mixes them is cut by llama.cpp into
        micro-batches of equal tokens per sequence, which may leave a prompt's token alone in one:
        its cells, and all that follows, would then depend on what else ran. Kept apart, every
        prompt token is computed as a prompt and every new token as a decode, whatever the other
        requests do, so a request's text is the text it gets alone.
        """
        decoding, chunks = self._plan(self._slots.active())
        if decoding:
            self._decode([(slot, 1) for slot in decoding])
        for slot, count in chunks:
            self._decode([(slot, count)])

    def _decode(self, work: list[tuple[Slot, int]]) -> None:
        """Decode ``count`` pending tokens of each slot in one call, then sample those that are due."""
        batch = self._batch.batch
        entries: list[_Entry] = []
        row = 0
        for slot, count in work:
            assert slot.sequence is not None
            pending = slot.sequence.pending
            tokens = pending[:count]
            for offset, token in enumerate(tokens):
                batch.token[row] = token
                batch.pos[row] = len(slot.tokens) + offset
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = slot.seq_id
                batch.logits[row] = 0
                row += 1
            sampled = len(tokens) == len(pending)  # the prompt's last token, or a sampled one
            if sampled:
                batch.logits[row - 1] = 1
            entries.append((slot, tokens, row - 1 if sampled else None))
        batch.n_tokens = row
        code = llama_cpp.llama_decode(self._context.ctx, batch)
        if code != 0:
            raise EngineError(f"llama_decode returned {code}")
        for slot, tokens, sampled_row in entries:
            sequence = slot.sequence
            assert sequence is not None and sequence.sampler is not None
            slot.tokens.extend(tokens)
            del sequence.pending[: len(tokens)]
            if sequence.prompt_left:
                sequence.prompt_left -= len(tokens)
                self.prompt_tokens_decoded += len(tokens)
            if sampled_row is not None and sequence.accept(
                sequence.sampler.sample(self._context, sampled_row)
            ):
                self._slots.release(slot)

    def _plan(self, active: list[Slot]) -> tuple[list[Slot], list[tuple[Slot, int]]]:
        """This step's work: the decoding sequences, and the prompt chunks that fit in what is left
        of ``step_tokens``, the earliest admitted prompt first."""
        decoding = [slot for slot in active if slot.sequence is not None and not slot.sequence.prompt_left]
        prefilling = [slot for slot in active if slot.sequence is not None and slot.sequence.prompt_left]
        prefilling.sort(key=lambda slot: slot.last_used)
        budget = self._step_tokens - len(decoding)
        chunks: list[tuple[Slot, int]] = []
        for slot in prefilling:
            assert slot.sequence is not None
            left = len(slot.sequence.pending)
            count = min(budget, left, self._chunk_tokens)
            if left - count == 1:
                count -= 1  # a prompt's last token is never left alone (see _step)
            if count < min(2, left):
                continue
            chunks.append((slot, count))
            budget -= count
        return decoding, chunks

    def _fail_all(self, error: EngineError) -> None:
        for slot in self._slots.active():
            assert slot.sequence is not None
            slot.sequence.fail(error)
            self._slots.forget(slot)
