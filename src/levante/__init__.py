"""Levante: run, serve, tune, evaluate and cost out Mistral Small 3 and its architecture family."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "Completion", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import levante.weights.hub` (e.g. for `levante pull`) does not load the engine.
    if name == "SamplingParams":
        from levante.engine.sampler import SamplingParams

        return SamplingParams
    if name in ("LLM", "Completion"):
        from levante import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'levante' has no attribute {name!r}")
