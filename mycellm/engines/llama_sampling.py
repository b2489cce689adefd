"""Sampler chains for llama.cpp sequences: one per request, built from its sampling choices, grammar and seed."""

from __future__ import annotations

import random

import llama_cpp
from llama_cpp._internals import LlamaModel, LlamaSampler

from mycellm.engines.grammar import compile_grammar
from mycellm.engines.llama_prompts import PreparedRequest
from mycellm.errors import InvalidRequestError

# What llama-cpp-python's Llama.generate used (its last_n_tokens_size): the presence and frequency
# penalties look at the last 64 tokens, so outputs stay what the one-request engine gave.
PENALTY_LAST_TOKENS = 64


def request_seed(seed: int | None) -> int:
    """The request's seed as llama.cpp's 32-bit one, or a random one."""
    return (seed if seed is not None else random.randrange(2**31)) & 0xFFFFFFFF


def build_sampler(model: LlamaModel, prepared: PreparedRequest) -> LlamaSampler:
    """The chain Llama.generate builds for these choices: penalties, grammar, then greedy at
    temperature 0, else top-k 40, top-p, min-p 0.05, temperature and a seeded draw.

    The caller owns the chain and closes it when the sequence ends (``LlamaSampler.close``).
    """
    request = prepared.request
    sampler = LlamaSampler()
    try:
        sampler.add_penalties(
            n_vocab=model.n_vocab(),
            penalty_last_n=PENALTY_LAST_TOKENS,
            penalty_repeat=1.0,
            penalty_freq=request.frequency_penalty,
            penalty_present=request.presence_penalty,
        )
        _add_grammar(model, sampler, prepared)
        if request.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(40)
            sampler.add_top_p(request.top_p, 1)
            sampler.add_min_p(0.05, 1)
            sampler.add_temp(request.temperature)
            sampler.add_dist(request_seed(request.seed))
    except BaseException:
        sampler.close()
        raise
    return sampler


def _add_grammar(model: LlamaModel, sampler: LlamaSampler, prepared: PreparedRequest) -> None:
    grammar = compile_grammar(prepared.grammar_text, prepared.grammar_is_schema)
    if grammar is None:
        return
    compiled = llama_cpp.llama_sampler_init_grammar(
        model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
    )
    if not compiled:  # llama.cpp could not parse the grammar (it returns NULL)
        raise InvalidRequestError("the grammar of this request cannot be compiled", param="response_format")
    llama_cpp.llama_sampler_chain_add(sampler.sampler, compiled)
