"""The names and tiers a model entry is served under, known from the config alone (no backend is
imported): what a network authority lists in its description before any engine has loaded."""

from __future__ import annotations

from pathlib import Path

from mycellm.config import BUNDLED_MODEL, ModelSettings, Tier

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_TIER: Tier = "tiny"


def model_name_for(settings: ModelSettings) -> str:
    """llama.cpp: the configured name, else the bundled model's name, else the file's stem.
    vLLM: the configured name, else the directory name of a local model, else the Hugging Face id."""
    if settings.name:
        return settings.name
    if settings.backend == "vllm":
        local = Path(settings.path).expanduser()
        return local.name if local.exists() else settings.path
    return BUNDLED_NAME if settings.path == BUNDLED_MODEL else Path(settings.path).stem


def model_tier_for(settings: ModelSettings) -> Tier | None:
    """The configured tier; the bundled model is ``tiny`` unless configured otherwise."""
    if settings.tier is not None:
        return settings.tier
    return BUNDLED_TIER if settings.backend == "llama_cpp" and settings.path == BUNDLED_MODEL else None


def configured_names(settings: ModelSettings) -> tuple[str, ...]:
    """Every name the entry will serve that the config alone tells: an upstream entry lists its
    models (or its one name); one that lists none is only known once the upstream answers."""
    if settings.backend != "openai":
        return (model_name_for(settings),)
    if settings.name and len(settings.upstream_models) <= 1:
        return (settings.name,)
    return settings.upstream_models
