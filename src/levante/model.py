"""Transformer: one Mistral/Llama-family decoder (RMSNorm, rotary, GQA attention, SwiGLU).

Parameter names follow the HF checkpoint layout (`model.layers.{i}.self_attn.q_proj`, ...), so
HF safetensors load as they are, PEFT adapters target the usual module names, and the GGUF
and consolidated loaders only rename and un-permute. The model knows nothing of paging,
quantization or LoRA: those swap layers or pass an `AttentionBackend`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

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


class RowConcatenable(Protocol):
    """A linear layer type that can stack several of its layers' output rows into one layer.

    `concat` returns None where the parts cannot be joined (different formats, alignment);
    the joined layer's weights must back the parts' (the parts become views), so fusing
    costs no memory.
    """

    @classmethod
    def concat(cls, parts: Sequence[nn.Module]) -> nn.Module | None:
        """One layer computing torch.cat([p(x) for p in parts], -1), or None."""
        ...


def concat_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One layer for `parts` stacked by output rows, backing their weights; None if they differ.

    Example: q [576, 576], k [192, 576], v [192, 576] -> one [960, 576] layer whose rows
    0-575 are q's; afterwards q.weight is a view of those rows. Weights a loader already
    read as consecutive rows of one tensor are joined as a view of it, without a copy.
    """
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is nn.Linear:
        linears = [p for p in parts if isinstance(p, nn.Linear)]  # all of them: one type
        if any(p.bias is not None for p in linears):
            return None
        weights = [p.weight for p in linears]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return None
        joined = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False,
                           device="meta")
        stacked = stacked_view(weights)  # a loader may have read them so already
        joined.weight = nn.Parameter(torch.cat([w.detach() for w in weights])
                                     if stacked is None else stacked, requires_grad=False)
        start = 0
        for part, weight in zip(linears, weights):
            end = start + weight.shape[0]
            part.weight = nn.Parameter(joined.weight[start:end], requires_grad=False)
            start = end
        return joined
    concat = getattr(kind, "concat", None)
    return concat(parts) if concat is not None else None


def stacked_view(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor whose consecutive row blocks `weights` already are, as a view; else None.

    Example: q = buf[0:1024], k = buf[1024:1280] (contiguous, same storage) -> buf[0:1280].
    """
    first = weights[0].detach()
    offset = first.storage_offset()
    for weight in weights:
        if (not weight.is_contiguous() or weight.storage_offset() != offset
                or weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += weight.numel()
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]),
                            (first.shape[1], 1))


@dataclass(frozen=True, eq=False)  # identity, not tensor ==
class FusedProjection:
    """A joined layer (`concat_linears`) and the parts it computes, valid while they stay.

    The parts' weights are views of the joined layer's, so in-place updates reach both. A part
    swapped for another module (a LoRA wrapper, a quantized layer, a new Linear) or given new
    parameters/buffers leaves the joined layer computing with the old weights: `is_current`
    then says no and the owner computes the parts one by one.
    """

    layer: nn.Module
    parts: tuple[nn.Module, ...]
    tensors: tuple[torch.Tensor | None, ...]  # the parts' own parameters and buffers

    @classmethod
    def join(cls, parts: Sequence[nn.Module]) -> FusedProjection | None:
        """Join `parts` by output rows, or None where their types cannot be joined."""
        layer = concat_linears(parts)
        return None if layer is None else cls(layer, tuple(parts), _own_tensors(parts))

    def is_current(self, parts: Sequence[nn.Module]) -> bool:
        """Whether `parts` are the very modules, holding the very tensors, joined here."""
        if any(now is not then for now, then in zip(parts, self.parts, strict=True)):
            return False
        return all(now is then for now, then in zip(_own_tensors(parts), self.tensors,
                                                    strict=True))


def _own_tensors(parts: Sequence[nn.Module]) -> tuple[torch.Tensor | None, ...]:
    return tuple(t for p in parts for t in (*p._parameters.values(), *p._buffers.values()))


class FusableProjections(nn.Module):
    """A block whose projections `part_names` can run as one matmul (`fuse`), safely.

    Swapping a part (`setattr`, `set_submodule`, PEFT's and `quantize_model`'s swaps) drops
    the joined layer, freeing its weights; moving or casting the block (`.to()`) joins the
    moved parts again; forward checks `FusedProjection.is_current` for anything else (a
    part's weight reassigned), so a stale joined layer is never used.
    """

    part_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        # A plain attribute, not a registered submodule: parameters(), state_dict() and byte
        # counts see each weight once, under its HF name.
        self.fusion: FusedProjection | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.part_names:
            self.__dict__["fusion"] = None  # the joined layer would keep the old part's weights
        super().__setattr__(name, value)

    def parts(self) -> tuple[nn.Module, ...]:
        """The current part modules, in `part_names` order."""
        return tuple(getattr(self, name) for name in self.part_names)

    def joined(self) -> nn.Module | None:
        """The joined layer if it still computes exactly the current parts, else None."""
        fusion = self.fusion
        return fusion.layer if fusion is not None and fusion.is_current(self.parts()) else None

    def fuse(self) -> bool:
        """Join the current parts (kept if already joined); False where they cannot be."""
        if self.joined() is None:
            self.fusion = FusedProjection.join(self.parts())
        return self.fusion is not None

    def unfuse(self) -> None:
        """Back to one matmul per part."""
        self.fusion = None

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> FusableProjections:
        # .to()/.half()/.cuda() give each part new storage the joined layer does not share.
        was_fused, self.fusion = self.fusion is not None, None
        super()._apply(fn, recurse)
        if was_fused:
            self.fuse()
        return self


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the HF reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel (3 us vs 10 us for the spelled-out ops on this CPU).
        dtype = x.dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(dtype)


def rotary_table(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_positions): each [max_positions, head_dim / 2], float32.

    Rotate-half layout: entry j and j + head_dim/2 share frequency theta^(-2j/head_dim), so
    one half is stored and `rotary_factors` widens the rows a forward reads (at 32K positions
    and head_dim 128 that halves 32 MB). Under the meta device only the shapes are made:
    torch's meta math imports torch._dynamo.
    """
    half = config.head_dim // 2
    if torch.empty(0).device.type == "meta":
        return torch.empty(max_positions, half), torch.empty(max_positions, half)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.int64)
                                            .float() * 2 / config.head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotary_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_table` rows [..., head_dim / 2] -> (cos, signed sin) [..., 1, head_dim] for
    `apply_rotary`.

    Rotate-half is x * cos + [-x2, x1] * sin = x * cos + roll(x, half) * [-sin1, sin2], so
    with the sign folded into sin once per forward, each layer rotates with one roll and
    two multiplies. Example, head_dim 4, x = [a, b, c, d]: roll gives [c, d, a, b], and
    [-s0, -s1, s0, s1] * [c, d, a, b] = [-c s0, -d s1, a s0, b s1], as rotate-half's.
    """
    return (torch.cat([cos, cos], dim=-1).unsqueeze(-2),
            torch.cat([-sin, sin], dim=-1).unsqueeze(-2))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., heads, head_dim] by `rotary_factors`' tables [..., 1, head_dim]."""
    out = x * cos
    return out.addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)


class Attention(FusableProjections):
    """Grouped-query attention; `backend=None` means plain causal attention over the input."""

    part_names = ("q_proj", "k_proj", "v_proj")

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
        qkv_proj = self.joined()  # q, k, v in one matmul (`fuse`), if still current
        if qkv_proj is not None:
            q, k, v = self._joined_qkv(qkv_proj, x, cos, sin)
        else:
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

    def _joined_qkv(self, qkv_proj: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v from one matmul, q and k rotated together (all views of one buffer)."""
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = qkv_proj(x).unflatten(-1, (heads, self.head_dim))  # [..., H + 2 KV, hd]
        num_qk = self.num_heads + self.num_kv_heads
        qk = apply_rotary(qkv[..., :num_qk, :], cos, sin).to(x.dtype)
        return qk[..., :self.num_heads, :], qk[..., self.num_heads:, :], qkv[..., num_qk:, :]


class MLP(FusableProjections):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    part_names = ("gate_proj", "up_proj")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up_proj = self.joined()  # gate and up in one matmul (`fuse`), if still current
        if gate_up_proj is not None:
            gate, up = gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
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


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, N(0, 1)-initialised except on the meta device: there torch's `normal_`
    goes through its Python references and imports torch._dynamo and sympy (~80 MB resident,
    for weights a checkpoint replaces anyway)."""
    weight = torch.empty(num, dim)  # on the ambient device, as nn.Embedding would place it
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class Decoder(nn.Module):
    """Embedding, layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    """The decoder plus output head; `forward` returns final hidden states, `logits` projects."""

    lm_head: nn.Module  # quantization and tensor parallelism swap the head
    rope_cos: torch.Tensor  # [max_positions, head_dim] buffers (register_buffer)
    rope_sin: torch.Tensor

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
        cos, sin = rotary_factors(self.rope_cos[positions], self.rope_sin[positions])
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

    def fuse_projections(self) -> int:
        """Join each layer's q/k/v and gate/up linears into one matmul each (inference).

        The joined layer's weights back the parts (views), so memory is unchanged and the
        HF-named parts keep working. Safe against later changes (`FusableProjections`): a
        swapped part (LoRA, quantization) drops its joined layer, a moved model re-joins.
        Plain `nn.Linear`s join; other layer types where they implement `RowConcatenable`.
        Calling it again keeps what is still joined. Returns how many groups are joined.
        """
        return sum(block.fuse() for layer in self.decoder_layers()
                   for block in (layer.self_attn, layer.mlp))

    def unfuse_projections(self) -> None:
        """Back to one matmul per HF linear."""
        for layer in self.decoder_layers():
            layer.self_attn.unfuse()
            layer.mlp.unfuse()

    def decoder_layers(self) -> list[DecoderLayer]:
        """`model.layers` as their class (an nn.ModuleList yields plain Modules)."""
        return [cast(DecoderLayer, layer) for layer in self.model.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., vocab] in float32."""
        return self.lm_head(hidden).float()
