"""Inference engines behind one protocol; ``build_engine`` imports a backend only when it is used."""

from __future__ import annotations

from mycellm.config import ModelSettings
from mycellm.engines.protocol import InferenceEngine


def build_engine(settings: ModelSettings) -> InferenceEngine:
    if settings.backend == "llama_cpp":
        from mycellm.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(settings)
    if settings.backend == "openai":
        from mycellm.engines.openai_upstream import OpenAIUpstreamEngine

        return OpenAIUpstreamEngine(settings)
    from mycellm.engines.vllm import VllmEngine

    return VllmEngine(settings)
