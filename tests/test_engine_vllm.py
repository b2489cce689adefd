"""Tests of the vLLM engine: the parts that need no GPU here, a real vLLM on a CUDA GPU where there is one."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mycellm.config import ModelSettings
from mycellm.engines.base import EmbeddingRequest, GenerationRequest, InferenceEngine, collect
from mycellm.engines.vllm import VllmEngine, json_constraint
from mycellm.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    UnsupportedParameterError,
)

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
