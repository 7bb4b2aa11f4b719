"""What the engine tests share: the tiny random Mistral as a float32 Transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from levante.config import ModelConfig
from levante.model import Transformer
from levante.weights.safetensors import hf_shards, load_safetensors_state_dict


@pytest.fixture(scope="module")
def model(tiny_mistral_hf: Path) -> Transformer:
    """The tiny Mistral folder's weights in float32, with a 512-token context."""
    config = ModelConfig.from_hf(json.loads((tiny_mistral_hf / "config.json").read_text()))
    config = config.replace(max_seq_len=512)
    state = load_safetensors_state_dict(hf_shards(tiny_mistral_hf), config, dtype=torch.float32)
    return Transformer.from_state_dict(config, state)
