"""Tests of the vLLM engine: the parts that need no GPU here, a real vLLM on a CUDA GPU where there is one."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from mycellm.config import ModelSettings
from mycellm.engines.continuation import RESUME_UNSUPPORTED, ContinuationStopMatcher
from mycellm.engines.protocol import InferenceEngine, collect
from mycellm.engines.vllm import VllmEngine, json_constraint
from mycellm.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    UnsupportedParameterError,
)
from mycellm.types import EmbeddingRequest, GenerationRequest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# A small chat model vLLM can run; point MYCELLM_VLLM_MODEL at a local copy on machines without network.
GPU_MODEL = os.environ.get("MYCELLM_VLLM_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
GPU_CONTEXT_TOKENS = 1024


def cuda_available() -> bool:
    # torch is imported only where vLLM is installed: it is slow to import and absent elsewhere.
    if not HAS_VLLM:
        return False
    import torch

    return bool(torch.cuda.is_available())


def chat(text: str, **fields: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-vllm", model="any", messages=({"role": "user", "content": text},), **fields
    )


# -- without a GPU ------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_vllm() -> None:
    # A fresh interpreter: another test may already have imported vLLM into this one.
    code = "import sys, mycellm.engines.vllm; assert 'vllm' not in sys.modules, 'vllm was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_construction_needs_no_vllm() -> None:
    engine = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model", tier="capable", tags=("gpu",)))
    assert isinstance(engine, InferenceEngine)
    [info] = engine.models()
    assert (info.name, info.backend, info.tier, info.tags) == ("Org/Some-Model", "vllm", "capable", ("gpu",))
    assert not info.supports_embeddings
    named = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model", name="house"))
    assert named.models()[0].name == "house"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
async def test_start_without_vllm_says_how_to_install_it() -> None:
    engine = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model"))
    with pytest.raises(EngineError, match=r"not installed.*mycellm\[vllm\]"):
        await engine.start()


async def test_generation_before_start_is_an_engine_error() -> None:
    engine = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model"))
    with pytest.raises(EngineError, match="not loaded"):
        await collect(engine.generate(chat("hello")))


async def test_embeddings_are_unsupported() -> None:
    engine = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model"))
    with pytest.raises(UnsupportedParameterError, match="embeddings"):
        await engine.embed(EmbeddingRequest(request_id="e", model="Org/Some-Model", inputs=("x",)))


def test_response_format_becomes_a_json_constraint() -> None:
    assert json_constraint(None) is None
    assert json_constraint({"type": "text"}) is None
    assert json_constraint({"type": "json_object"}) == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == {
        "json": schema
    }
    with pytest.raises(InvalidRequestError, match="schema"):
        json_constraint({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequestError, match="xml"):
        json_constraint({"type": "xml"})


# -- resuming a generation, on a fake of vLLM (the GPU is not there) ---------------------------

BOS = 1
ANSWER = "The sky is blue because the air scatters blue light more than red light."


class CharacterTokenizer:
    """One token per character, so text and tokens round-trip exactly; a BOS for completion prompts."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(character) for character in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(token) for token in tokens if token != BOS)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool, add_generation_prompt: bool, **options: Any
    ) -> str:
        text = "".join(f"<{message['role']}>{message['content']}\n" for message in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeSamplingParams:
    """Stands for vllm.SamplingParams: keeps the options it was built with."""

    def __init__(self, **options: Any) -> None:
        self.options = options


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class FakeOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    finished: bool


class FakeVllm:
    """Stands for vLLM's AsyncLLMEngine: it "generates" ANSWER one character (token) at a time,
    going on from the part of ANSWER the prompt already ends with, with vLLM's cumulative outputs,
    its max_tokens, and its stop strings matched in the new text only and held back while they
    may still match."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.sampling: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.tokenizer = CharacterTokenizer()

    def generate(
        self, inputs: dict[str, list[int]], sampling: FakeSamplingParams, request_id: str
    ) -> AsyncIterator[FakeOutput]:
        self.prompts.append(inputs["prompt_token_ids"])
        self.sampling.append(sampling.options)
        return self._outputs(inputs["prompt_token_ids"], sampling.options)

    async def _outputs(self, prompt: list[int], options: dict[str, Any]) -> AsyncIterator[FakeOutput]:
        text = self.tokenizer.decode(prompt)
        already = max(size for size in range(len(ANSWER) + 1) if text.endswith(ANSWER[:size]))
        stops: list[str] = options["stop"] or []
        produced = ""
        for character in ANSWER[already:]:
            produced += character
            tokens = [ord(character) for character in produced]
            found = [produced.find(stop) for stop in stops if stop in produced]
            if found:
                yield FakeOutput(prompt, [FakeCompletion(produced[: min(found)], tokens, "stop")], True)
                return
            if len(produced) >= options["max_tokens"]:
                yield FakeOutput(prompt, [FakeCompletion(produced, tokens, "length")], True)
                return
            held = max(
                (size for stop in stops for size in range(1, len(stop)) if produced.endswith(stop[:size])),
                default=0,
            )
            yield FakeOutput(prompt, [FakeCompletion(produced[: len(produced) - held], tokens, None)], False)
        tokens = [ord(character) for character in produced]
        yield FakeOutput(prompt, [FakeCompletion(produced, tokens, "stop")], True)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture
def fake_vllm() -> FakeVllm:
    return FakeVllm()


@pytest.fixture
def faked(fake_vllm: FakeVllm) -> VllmEngine:
    engine = VllmEngine(ModelSettings(backend="vllm", path="Org/Some-Model", context_tokens=400))
    engine._engine, engine._tokenizer = fake_vllm, fake_vllm.tokenizer
    engine._sampling_params = FakeSamplingParams
    return engine


async def test_the_fake_generates_the_answer_with_exact_usage(faked: VllmEngine) -> None:
    result = await collect(faked.generate(chat("Why is the sky blue?", max_tokens=20)))
    assert (result.text, result.finish_reason) == (ANSWER[:20], "length")
    prompt = "<user>Why is the sky blue?\n<assistant>"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt), 20)


async def test_a_resumed_chat_streams_only_new_text_with_the_whole_usage(
    faked: VllmEngine, fake_vllm: FakeVllm
) -> None:
    chunks = [
        chunk
        async for chunk in faked.generate(
            chat("Why is the sky blue?", max_tokens=20, continuation=ANSWER[:8])
        )
    ]
    assert "".join(chunk.text for chunk in chunks) == ANSWER[8:20]
    final = chunks[-1]
    assert final.finish_reason == "length" and final.usage is not None
    prompt = "<user>Why is the sky blue?\n<assistant>"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), 20)
    assert fake_vllm.prompts[-1] == CharacterTokenizer().encode(prompt + ANSWER[:8], add_special_tokens=False)
    assert fake_vllm.sampling[-1]["max_tokens"] == 12


async def test_a_resumed_completion_is_not_echoed_and_counts_its_bos(
    faked: VllmEngine, fake_vllm: FakeVllm
) -> None:
    request = GenerationRequest(
        request_id="c", model="any", prompt="Sky? ", max_tokens=30, echo=True, continuation=ANSWER[:7]
    )
    result = await collect(faked.generate(request))
    assert result.text == ANSWER[7:30]
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (1 + len("Sky? "), 30)
    assert fake_vllm.prompts[-1][0] == BOS


async def test_a_continuation_that_fills_max_tokens_ends_without_generating(
    faked: VllmEngine, fake_vllm: FakeVllm
) -> None:
    for max_tokens in (20, 5):
        result = await collect(
            faked.generate(chat("Why is the sky blue?", max_tokens=max_tokens, continuation=ANSWER[:20]))
        )
        assert (result.text, result.finish_reason, result.usage.completion_tokens) == ("", "length", 20)
    assert fake_vllm.prompts == []


async def test_a_stop_string_across_the_seam_stops_and_frees_the_request(
    faked: VllmEngine, fake_vllm: FakeVllm
) -> None:
    continuation = "The sky is b"
    # "is blue" starts in the continuation: vLLM, which matches its new text only, would go on.
    stopped = await collect(
        faked.generate(chat("Why?", max_tokens=40, continuation=continuation, stop=("is blue",)))
    )
    assert (stopped.text, stopped.finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == len(continuation) + len("lue")
    assert len(fake_vllm.aborted) == 1
    # "is bold" holds the continuation's "is b" back until it cannot match: it is not sent again.
    held = await collect(
        faked.generate(chat("Why?", max_tokens=40, continuation=continuation, stop=("is bold",)))
    )
    assert held.text == ANSWER[len(continuation) : 40]
    # A stop wholly in the new text is vLLM's to match, as without a continuation.
    cut = await collect(faked.generate(chat("Why?", max_tokens=40, continuation=continuation, stop=("air",))))
    assert (cut.text, cut.finish_reason) == ("lue because the ", "stop")


async def test_a_constrained_generation_cannot_be_resumed(faked: VllmEngine, fake_vllm: FakeVllm) -> None:
    request = chat("x", continuation="{", response_format={"type": "json_object"})
    with pytest.raises(EngineError, match="cannot resume a constrained generation") as caught:
        await collect(faked.generate(request))
    assert caught.value.code == RESUME_UNSUPPORTED
    assert fake_vllm.prompts == []


def test_the_continuation_stop_matcher_never_sends_the_continuation_again() -> None:
    # A stop that straddles the seam.
    matcher = ContinuationStopMatcher(("xyz",), "abc xy")
    assert matcher.feed("z and more") == "" and matcher.stopped
    # A held tail released when it cannot match any more: only new text comes out.
    matcher = ContinuationStopMatcher(("xyz", "yq"), "abc xy")
    assert (matcher.feed("w"), matcher.feed("v"), matcher.flush()) == ("w", "v", "")
    # A shorter stop found inside the held tail stops without sending the tail's head.
    matcher = ContinuationStopMatcher(("xyz", "yq"), "abc xy")
    assert matcher.feed("q") == "" and matcher.stopped
    # A continuation that ends in a stop string has stopped already.
    assert ContinuationStopMatcher(("xyz", "c"), "abc").stopped
    # Without stops, or with only one-character ones, the continuation changes nothing.
    assert ContinuationStopMatcher((), "abc xy").feed("zq") == "zq"
    assert ContinuationStopMatcher(("q",), "abc xy").feed("zq") == "z"
    # Text held at the end (a possible stop) is flushed, the continuation's part excepted.
    matcher = ContinuationStopMatcher(("xyz",), "abc x")
    assert (matcher.feed("y"), matcher.flush()) == ("", "y")


# -- on a CUDA GPU with vLLM --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs vLLM and a CUDA GPU")
@pytest.mark.asyncio(loop_scope="module")
class TestOnGpu:
    """One engine for the class: loading a model into vLLM takes tens of seconds."""

    @pytest_asyncio.fixture(scope="class", loop_scope="module")
    async def engine(self) -> AsyncIterator[VllmEngine]:
        settings = ModelSettings(
            backend="vllm", path=GPU_MODEL, context_tokens=GPU_CONTEXT_TOKENS, gpu_memory_utilization=0.3
        )
        started = VllmEngine(settings)
        await started.start()
        yield started
        await started.close()

    async def test_stream_has_text_deltas_and_exact_usage(self, engine: VllmEngine) -> None:
        request = chat("Count from one to ten.", max_tokens=12, temperature=0)
        chunks = [chunk async for chunk in engine.generate(request)]
        final = chunks[-1]
        assert final.finish_reason in ("stop", "length") and final.usage is not None
        assert all(chunk.text for chunk in chunks[:-1])
        assert 1 <= final.usage.completion_tokens <= 12
        tokenizer = engine._tokenizer
        prompt = tokenizer.apply_chat_template(
            list(request.messages or ()), tokenize=False, add_generation_prompt=True
        )
        assert final.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))

    async def test_max_tokens_ends_with_length(self, engine: VllmEngine) -> None:
        result = await collect(engine.generate(chat("Write a long story about the sea.", max_tokens=5)))
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == 5

    async def test_legacy_completion_with_echo(self, engine: VllmEngine) -> None:
        request = GenerationRequest(request_id="c", model="any", prompt="The sky is", max_tokens=4, echo=True)
        result = await collect(engine.generate(request))
        assert result.text.startswith("The sky is")
        assert result.usage.completion_tokens <= 4

    async def test_json_object_output_parses(self, engine: VllmEngine) -> None:
        request = chat(
            "Give a JSON object with a field name.",
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_object"},
        )
        result = await collect(engine.generate(request))
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)

    async def test_a_prompt_over_the_window_is_a_context_length_error(self, engine: VllmEngine) -> None:
        with pytest.raises(ContextLengthError, match=str(GPU_CONTEXT_TOKENS)):
            await collect(engine.generate(chat("word " * (GPU_CONTEXT_TOKENS * 2))))

    async def test_a_resumed_generation_counts_the_whole_answer(self, engine: VllmEngine) -> None:
        request = chat("Write a long story about the sea.", max_tokens=16, temperature=0, seed=1)
        chunks = [chunk async for chunk in engine.generate(request)]
        plain = chunks[-1]
        assert plain.finish_reason == "length" and plain.usage is not None
        continuation = "".join(chunk.text for chunk in chunks[:-1])[:20]
        tokenizer = engine._tokenizer
        prompt = tokenizer.apply_chat_template(
            list(request.messages or ()), tokenize=False, add_generation_prompt=True
        )
        added = len(tokenizer.encode(prompt + continuation, add_special_tokens=False)) - len(
            tokenizer.encode(prompt, add_special_tokens=False)
        )
        resumed = chat(
            "Write a long story about the sea.", max_tokens=16, temperature=0, continuation=continuation
        )
        result = await collect(engine.generate(resumed))
        assert result.finish_reason == "length"
        assert result.usage.prompt_tokens == plain.usage.prompt_tokens
        assert result.usage.completion_tokens == 16
        assert 0 < added < 16 and not result.text.startswith(continuation)

    async def test_closing_early_aborts_and_the_engine_goes_on(self, engine: VllmEngine) -> None:
        stream = engine.generate(chat("Write a very long story.", max_tokens=800))
        async with asyncio.timeout(60):
            await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            result = await collect(engine.generate(chat("Say hi.", max_tokens=4)))
        assert result.usage.completion_tokens <= 4
        # The V1 engine keeps unfinished requests in its output processor; an aborted one must be gone.
        processor = getattr(engine._engine, "output_processor", None)
        if processor is not None and hasattr(processor, "get_num_unfinished_requests"):
            assert processor.get_num_unfinished_requests() == 0
