"""Shared fixtures: the real SmolLM2 GGUF, Mistral's Tekken file, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def levante_home() -> Path:
    return Path(os.environ.get("LEVANTE_HOME", Path.home() / ".cache" / "levante"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file (pulled by `make test` before pytest starts)."""
    path = levante_home() / "models" / "smollm2" / SMOLLM2_FILE
    if not path.exists():
        from levante.weights.hub import pull

        pull("smollm2")
    assert path.exists(), f"{path} missing after pull"
    return path


@pytest.fixture(scope="session")
def tekken_path() -> Path:
    """Mistral's Tekken tokenizer file as shipped in mistral-common (131072-token vocab)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
