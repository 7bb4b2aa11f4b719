"""Transformer: one Mistral/Llama-family decoder (RMSNorm, rotary, GQA attention, SwiGLU).

Parameter names follow the HF checkpoint layout (`model.layers.{i}.self_attn.q_proj`, ...), so
HF safetensors load as they are, PEFT adapters target the usual module names, and the GGUF
and consolidated loaders only rename and un-permute. The model knows nothing of paging,
quantization or LoRA: those swap layers or pass an `AttentionBackend`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig


class AttentionBackend(Protocol):
    """Attention over a KV cache for a flattened batch of new tokens (see engine.attention)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, heads, head_dim]."""
        ...


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the HF reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_table(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_positions): each [max_positions, head_dim], float32.

    Rotate-half layout: entry j and j + head_dim/2 share frequency theta^(-2j/head_dim).
    """
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.int64)
                                            .float() * 2 / config.head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [..., heads, head_dim] by cos/sin: [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class Attention(nn.Module):
    """Grouped-query attention; `backend=None` means plain causal attention over the input."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend | None) -> torch.Tensor:
        # x: [..., dim] -> q: [..., heads, head_dim], k/v: [..., kv_heads, head_dim]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        q = apply_rotary(q, cos, sin).to(x.dtype)
        k = apply_rotary(k, cos, sin).to(x.dtype)
        if backend is None:  # x: [B, S, dim], causal over S
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, enable_gqa=True).transpose(1, 2)
        else:  # x: [T, dim], a flattened batch of new tokens
            out = backend.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    """The decoder plus output head; `forward` returns final hidden states, `logits` projects."""

    def __init__(self, config: ModelConfig, *, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_table(config, max_positions or config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                backend: AttentionBackend | None = None) -> torch.Tensor:
        """Hidden states after the final norm.

        Without a backend: input_ids [B, S], causal attention within each row.
        With one: input_ids and positions [T], a flattened batch the backend knows how to
        attend over. Returns [..., dim] matching input_ids' shape.
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        cos = self.rope_cos[positions]
        sin = self.rope_sin[positions]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, backend)
        return self.model.norm(x)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor], *,
                        device: str | torch.device = "cpu") -> Transformer:
        """A model holding `state`'s tensors as they are (built on the meta device: no copy)."""
        with torch.device("meta"):
            model = cls(config)
        if config.tie_embeddings:
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.rope_cos, model.rope_sin = rotary_table(config, config.max_seq_len)
        return model.to(device).eval()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., vocab] in float32."""
        return self.lm_head(hidden).float()
