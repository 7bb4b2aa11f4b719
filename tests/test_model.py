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
    qkv_proj = attn.joined()
    assert qkv_proj is not None
    joined = qkv_proj.weight
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
    assert mlp.fusion is None and mlp.joined() is None


# --- fusion survives layer swaps: a stale joined layer is never used -----------------------

def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


def test_swapped_part_after_fusion_computes_with_the_new_layer(tiny_mistral_hf: Path) -> None:
    """A new q_proj module and a reassigned gate weight: fused equals unfused with them."""
    ids = _tokens(131072, (2, 19), seed=4)
    fused, reference = _load(tiny_mistral_hf, False), _load(tiny_mistral_hf, False)
    assert fused.fuse_projections() == 2 * fused.config.num_layers
    before = _forward(fused, ids)
    gen = torch.Generator().manual_seed(5)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[1].mlp
    new_q = torch.nn.Linear(320, 512, bias=False)
    new_q.weight.data = torch.randn(512, 320, generator=gen) * 0.05
    new_gate = torch.randn(1024, 320, generator=gen) * 0.05
    attn.q_proj = new_q
    mlp.gate_proj.weight = torch.nn.Parameter(new_gate.clone(), requires_grad=False)
    assert attn.fusion is None  # the swap dropped the joined layer (and its weights)
    assert mlp.fusion is not None and mlp.joined() is None  # stale: forward goes around it
    reference.model.layers[0].self_attn.q_proj.weight.data = new_q.weight.data.clone()
    reference.model.layers[1].mlp.gate_proj.weight.data = new_gate.clone()
    got, expected = _forward(fused, ids), _forward(reference, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - before).abs().max().item() > 1e-2  # the swaps change the output
    assert fused.fuse_projections() == 2 * fused.config.num_layers  # joins the new parts
    torch.testing.assert_close(_forward(fused, ids), expected, rtol=0, atol=1e-5)


def test_quantize_model_after_fusion_equals_quantizing_unfused(tiny_mistral_hf: Path) -> None:
    from levante.quant.linear import quantize_model

    ids = _tokens(131072, (1, 11), seed=6)
    fused, reference = _load(tiny_mistral_hf, False), _load(tiny_mistral_hf, False)
    fused.fuse_projections()
    float_logits = _forward(fused, ids)
    quantize_model(fused, "int8")
    quantize_model(reference, "int8")
    assert all(block.fusion is None for layer in fused.model.layers
               for block in (layer.self_attn, layer.mlp))
    got = _forward(fused, ids)
    torch.testing.assert_close(got, _forward(reference, ids), rtol=0, atol=1e-6)
    assert (got - float_logits).abs().max().item() > 1e-4  # int8 weights, not the float ones


def test_lora_wrap_after_fusion_equals_unfused_with_lora(tiny_mistral_hf: Path) -> None:
    """PEFT swaps q_proj/v_proj/up_proj for LoRA wrappers (nonzero B): fusion steps aside."""
    from peft import LoraConfig, get_peft_model

    ids = _tokens(131072, (2, 13), seed=7)
    fused, reference = _load(tiny_mistral_hf, False), _load(tiny_mistral_hf, False)
    fused.fuse_projections()
    base = _forward(fused, ids)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                init_lora_weights=False)
    for model in (fused, reference):
        torch.manual_seed(8)
        get_peft_model(model, LoraConfig(**lora))
    assert all(layer.self_attn.fusion is None and layer.mlp.fusion is None
               for layer in fused.model.layers)
    got = _forward(fused, ids)
    torch.testing.assert_close(got, _forward(reference, ids), rtol=0, atol=1e-5)
    assert (got - base).abs().max().item() > 1e-3  # the adapters take part


def test_moving_a_fused_model_joins_the_moved_parts(tiny_mistral_hf: Path) -> None:
    ids = _tokens(131072, (1, 9), seed=9)
    fused, reference = _load(tiny_mistral_hf, False), _load(tiny_mistral_hf, False)
    fused.fuse_projections()
    joined = fused.model.layers[0].self_attn.joined()
    assert joined is not None
    assert fused.fuse_projections() == 2 * fused.config.num_layers  # again: kept as it is
    assert fused.model.layers[0].self_attn.joined() is joined
    fused.to(torch.float64)
    moved = fused.model.layers[0].self_attn.joined()
    assert moved is not None and moved.weight.dtype == torch.float64
    q = fused.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == moved.weight.data_ptr()  # the moved parts back the new join
    torch.testing.assert_close(_forward(fused, ids), _forward(reference.to(torch.float64), ids),
                               rtol=0, atol=1e-9)
