"""Our Transformer against transformers' MistralForCausalLM on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from levante.config import ModelConfig
from levante.model import Transformer
from levante.weights.safetensors import hf_shards, load_safetensors_state_dict


@pytest.fixture(scope="module")
def reference(tiny_mistral_hf: Path):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(tiny_mistral_hf, torch_dtype=torch.float32).eval()


def _tokens(vocab: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _load(folder: Path, consolidated: bool) -> torch.nn.Module:
    import json

    if consolidated:
        config = ModelConfig.from_params(json.loads((folder / "params.json").read_text()))
        files = [folder / "consolidated.safetensors"]
    else:
        config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        files = hf_shards(folder)
    state = load_safetensors_state_dict(files, config, dtype=torch.float32,
                                        consolidated=consolidated)
    return Transformer.from_state_dict(config, state)


@pytest.mark.parametrize("layout", ["hf", "consolidated"])
def test_logits_equal_transformers(layout: str, reference, tiny_mistral_hf: Path,
                                   tiny_mistral_consolidated: Path) -> None:
    folder = tiny_mistral_consolidated if layout == "consolidated" else tiny_mistral_hf
    ours = _load(folder, layout == "consolidated")
    assert ours.config.head_dim == 128 and ours.config.num_heads == 4 * ours.config.num_kv_heads
    ids = _tokens(ours.config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours.logits(ours(ids))
    assert (got - expected).abs().max().item() <= 1e-4


def test_rope_theta_and_positions_matter(reference, tiny_mistral_hf: Path) -> None:
    """Positions far apart (rope theta 1e8) still agree: a long sequence, last logits."""
    ours = _load(tiny_mistral_hf, False)
    ids = _tokens(ours.config.vocab_size, (1, 300), seed=2)
    with torch.no_grad():
        expected = reference(ids).logits[:, -5:]
        got = ours.logits(ours(ids))[:, -5:]
    assert (got - expected).abs().max().item() <= 1e-4


def test_fused_projections_equal_separate_and_share_memory(tiny_mistral_hf: Path) -> None:
    """q/k/v and gate/up joined into one matmul each: same logits, parts become views."""
    ours = _load(tiny_mistral_hf, False)
    ids = _tokens(ours.config.vocab_size, (2, 19), seed=3)
    with torch.no_grad():
        expected = ours.logits(ours(ids))
        assert ours.fuse_projections() == 2 * ours.config.num_layers
        got = ours.logits(ours(ids))
    attn = ours.model.layers[0].self_attn
    assert attn.qkv_proj is not None
    joined = attn.qkv_proj.weight
    assert attn.k_proj.weight.data_ptr() == joined[attn.q_proj.weight.shape[0]:].data_ptr()
    assert not any("qkv" in name or "gate_up" in name for name in ours.state_dict())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ours.unfuse_projections()
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), expected, rtol=0, atol=0)


def test_projections_of_different_kinds_stay_separate(tiny_mistral_hf: Path) -> None:
    ours = _load(tiny_mistral_hf, False)
    mlp = ours.model.layers[0].mlp
    mlp.up_proj = torch.nn.Sequential(mlp.up_proj)  # e.g. a wrapper (LoRA) on one part
    assert ours.fuse_projections() == 2 * ours.config.num_layers - 1
    assert mlp.gate_up_proj is None
