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

    Each step it admits waiting requests into free slots, builds one batch holding the next token
    of every decoding sequence and as much of the prefilling prompts as ``step_tokens`` leaves
    (a long prompt is prefilled in chunks while the others go on decoding), decodes it once and
    samples every sequence from its own row with its own sampler. A sequence the caller cancelled
    leaves its slot before the next step. With nothing to do the thread sleeps on a condition.
    """

    def __init__(self, context: LlamaContext, parallel: int, step_tokens: int) -> None:
        self._context = context
        self._slots = SlotTable(context.memory, parallel)
        self._step_tokens = max(step_tokens, parallel)  # every decoding sequence fits in one step
        self._batch = LlamaBatch(n_tokens=self._step_tokens, embd=0, n_seq_max=1, verbose=False)
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
        while self._waiting and self._slots.has_free():
            sequence = self._waiting.popleft()
            if sequence.cancelled.is_set():
                sequence.close()
            else:
                self._slots.admit(sequence)

    def _step(self) -> None:
        entries = self._fill()
        code = llama_cpp.llama_decode(self._context.ctx, self._batch.batch)
        if code != 0:
            raise EngineError(f"llama_decode returned {code}")
        for slot, tokens, row in entries:
            sequence = slot.sequence
            assert sequence is not None and sequence.sampler is not None
            slot.tokens.extend(tokens)
            del sequence.pending[: len(tokens)]
            if sequence.prompt_left:
                sequence.prompt_left -= len(tokens)
                self.prompt_tokens_decoded += len(tokens)
            if row is not None and sequence.accept(sequence.sampler.sample(self._context, row)):
                self._slots.release(slot)

    def _fill(self) -> list[_Entry]:
        """Write this step's tokens into the batch, slots in sequence-id order (llama.cpp splits a
        batch of separate KV streams into micro-batches of consecutive sequence ids)."""
        active = self._slots.active()
        counts = self._counts(active)
        batch = self._batch.batch
        entries: list[_Entry] = []
        row = 0
        for slot in active:
            assert slot.sequence is not None
            pending = slot.sequence.pending
            tokens = pending[: counts[slot.seq_id]]
            if not tokens:
                continue
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
        return entries

    def _counts(self, active: list[Slot]) -> dict[int, int]:
        """Tokens each slot decodes this step: one per decoding sequence, the rest of the step to
        the prompts being prefilled, the earliest admitted first."""
        counts: dict[int, int] = {}
        prefilling: list[Slot] = []
        for slot in active:
            assert slot.sequence is not None
            if slot.sequence.prompt_left:
                prefilling.append(slot)
            else:
                counts[slot.seq_id] = 1
        budget = self._step_tokens - len(counts)
        for slot in sorted(prefilling, key=lambda candidate: candidate.last_used):
            assert slot.sequence is not None
            counts[slot.seq_id] = min(budget, len(slot.sequence.pending))
            budget -= counts[slot.seq_id]
        return counts

    def _fail_all(self, error: EngineError) -> None:
        for slot in self._slots.active():
            assert slot.sequence is not None
            slot.sequence.fail(error)
            self._slots.forget(slot)
