"""The slot table of a batched llama.cpp context: one KV sequence per slot, what it holds, and prefix reuse."""

from __future__ import annotations

from dataclasses import dataclass, field

import llama_cpp

from mycellm.engines.llama_sequence import LlamaSequence


@dataclass
class Slot:
    """One sequence id of the context, the tokens its KV cells hold in order, and its request."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    sequence: LlamaSequence | None = None
    last_used: int = 0  # the admission count when it was last taken: the least recently used goes first


def common_prefix(held: list[int], wanted: list[int]) -> int:
    size = 0
    for a, b in zip(held, wanted, strict=False):
        if a != b:
            break
        size += 1
    return size


class SlotTable:
    """Slots of one context (touched by its scheduler thread only).

    A new request takes the free slot whose cells share the longest prefix with its tokens, so a
    repeated system prompt or a conversation's earlier turns are not decoded again; with no
    prefix to share it takes the least recently used slot, keeping the fresher caches.
    """

    def __init__(self, memory: llama_cpp.llama_memory_t, parallel: int) -> None:
        self._memory = memory
        self.slots = [Slot(seq_id) for seq_id in range(parallel)]
        self._admissions = 0

    def active(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.sequence is not None]

    def has_free(self) -> bool:
        return any(slot.sequence is None for slot in self.slots)

    def admit(self, sequence: LlamaSequence) -> Slot:
        """Put ``sequence`` in a free slot (there must be one); what the slot already holds of its
        tokens is kept, the rest of its cells removed, and ``sequence.pending`` is what is left."""
        tokens = sequence.pending
        free = [slot for slot in self.slots if slot.sequence is None]
        # The last two tokens are decoded again: sampling needs the last one's logits, and a token
        # decoded alone is computed as a decode, not as a prompt (see BatchScheduler._step).
        shared = {
            slot.seq_id: max(0, min(common_prefix(slot.tokens, tokens), len(tokens) - 2)) for slot in free
        }
        slot = max(free, key=lambda candidate: (shared[candidate.seq_id], -candidate.last_used))
        kept = shared[slot.seq_id]
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, kept, -1):
            # A memory that cannot drop a part of a sequence (recurrent models) drops all of it.
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            kept = 0
        del slot.tokens[kept:]
        self._admissions += 1
        slot.last_used = self._admissions
        slot.sequence = sequence
        sequence.pending = tokens[kept:]
        sequence.prompt_left = len(sequence.pending)
        return slot

    def release(self, slot: Slot) -> None:
        """The slot's request ended: its cells stay for a later request that shares their prefix."""
        if slot.sequence is not None:
            slot.sequence.close()
        slot.sequence = None

    def forget(self, slot: Slot) -> None:
        """Drop what the slot holds (after a failed decode its cells cannot be trusted)."""
        self.release(slot)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()
