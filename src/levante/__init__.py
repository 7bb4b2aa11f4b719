"""Levante: run, serve, tune, evaluate and cost out Mistral Small 3 and its architecture family."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["LLM", "Completion", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import levante.weights.hub` (e.g. for `levante pull`) does not load the engine.
    if name == "SamplingParams":
        from levante.engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("LLM", "Completion"):
        from levante import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'levante' has no attribute {name!r}")


def _import_gguf_lean() -> None:
    """Import `gguf` (llama.cpp's reader, which every Levante path uses) without the
    mistral-common tokenizers its `gguf.vocab` imports when they are installed: only llama.cpp's
    HF-to-GGUF converters use those, and they cost every process ~30 MB of RSS and ~0.35 s
    (mistral-common pulls pydantic and huggingface_hub), a third of `levante generate
    smollm2`'s start. Levante imports mistral-common itself, where a Tekken model needs it."""
    if "gguf" in sys.modules:
        return
    blocked = ("mistral_common.tokens.tokenizers.mistral", "mistral_common.tokens.tokenizers.utils")
    held = [name for name in blocked if name not in sys.modules]
    for name in held:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        import gguf  # noqa: F401
    finally:
        for name in held:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


_import_gguf_lean()
