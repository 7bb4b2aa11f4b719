"""Name tables and the q/k row permutation between checkpoint layouts."""

from __future__ import annotations

import torch

from levante.config import ModelConfig


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE to HF's rotate-half layout.

    Mistral's consolidated checkpoints and GGUF files rotate pairs (x0, x1), (x2, x3), ...;
    HF checkpoints (and our Transformer) rotate (x_i, x_{i + head_dim/2}). Per head the
    output rows [r0, r1, r2, r3, ...] become [r0, r2, r4, ..., r1, r3, r5, ...].
    Example, head_dim 4: rows [a0, a1, b0, b1] -> [a0, b0, a1, b1].
    weight: [num_heads * head_dim, in] (or [num_heads * head_dim] for a bias).
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    tail = weight.shape[1:]
    return (weight.reshape(num_heads, head_dim // 2, 2, *tail).transpose(1, 2)
            .reshape(rows, *tail))


def half_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (HF layout -> consolidated/GGUF layout)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    tail = weight.shape[1:]
    return (weight.reshape(num_heads, 2, head_dim // 2, *tail).transpose(1, 2)
            .reshape(rows, *tail))


# GGUF tensor name (per layer, after "blk.{i}.") -> HF name (after "model.layers.{i}.")
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Mistral consolidated name (per layer, after "layers.{i}.") -> HF name
CONSOLIDATED_LAYER_NAMES: dict[str, str] = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
CONSOLIDATED_GLOBAL_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str, *, layer_names: dict[str, str], global_names: dict[str, str],
            layer_prefix: str) -> str | None:
    """Map a GGUF or consolidated tensor name to our (HF) name; None if unknown.

    Example: hf_name("blk.3.attn_q.weight", ..., layer_prefix="blk.")
    -> "model.layers.3.self_attn.q_proj.weight".
    """
    if name in global_names:
        return global_names[name]
    if not name.startswith(layer_prefix):
        return None
    index, _, rest = name[len(layer_prefix):].partition(".")
    if not index.isdigit() or rest not in layer_names:
        return None
    return f"model.layers.{index}.{layer_names[rest]}"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor our Transformer loads (HF names) with its shape; lm_head only if untied."""
    c = config
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.dim),
        "model.norm.weight": (c.dim,),
    }
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    per_layer = {
        "input_layernorm.weight": (c.dim,),
        "self_attn.q_proj.weight": (q_rows, c.dim),
        "self_attn.k_proj.weight": (kv_rows, c.dim),
        "self_attn.v_proj.weight": (kv_rows, c.dim),
        "self_attn.o_proj.weight": (c.dim, q_rows),
        "post_attention_layernorm.weight": (c.dim,),
        "mlp.gate_proj.weight": (c.ffn_dim, c.dim),
        "mlp.up_proj.weight": (c.ffn_dim, c.dim),
        "mlp.down_proj.weight": (c.dim, c.ffn_dim),
    }
    for i in range(c.num_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes
