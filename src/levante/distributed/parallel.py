"""Tensor-parallel layers and the swap that turns a Transformer into one rank's shard of it.

"Swap the layers, transform the weights": `parallelize` takes a `Transformer` built on the
meta device and this rank's weight slices (see `shard_plan`, read by
`levante.distributed.loading`) and swaps in

- `ColumnParallelLinear` for q/k/v and gate/up: this rank keeps a slice of the *output* rows
  (its attention heads, its KV heads, its share of the FFN), no communication;
- `RowParallelLinear` for o and down: the matching slice of the *input* columns, then one
  all-reduce (sum) of the partial outputs: one after attention, one after the MLP;
- `VocabParallelEmbedding`: a slice of the vocabulary rows, lookups outside it give zeros,
  summed over ranks;
- `ParallelLMHead`: a slice of the output vocabulary; logits are all-gathered so every rank
  (rank 0 samples) sees the whole row. Tied models share the embedding's slice.

Norms are replicated. The model's `config` becomes the per-rank config (heads and KV heads
divided by N), so the engine's `KVCache(model.config, ...)` holds only this rank's heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.errors import ConfigError
from levante.model import Transformer, rotary_table
from levante.weights.layout import expected_shapes

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ShardSlice:
    """Rows (`dim` 0) or columns (`dim` 1) [start, stop) of a weight that one rank holds."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class ParallelInfo:
    """Where a sharded model sits: its rank, the world size and the unsharded config."""

    rank: int
    world_size: int
    full_config: ModelConfig


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Refuse a world size that does not divide the attention and KV head counts."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"tensor_parallel must be a positive integer, got {world_size!r}")
    if config.num_heads % world_size or config.num_kv_heads % world_size:
        divisors = [n for n in range(1, config.num_kv_heads + 1)
                    if config.num_heads % n == 0 and config.num_kv_heads % n == 0]
        raise ConfigError(
            f"tensor_parallel {world_size} does not divide this model's heads: num_heads "
            f"{config.num_heads} and num_kv_heads {config.num_kv_heads} must both be "
            f"multiples of it (possible: {', '.join(map(str, divisors))})")


def rank_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config one rank's attention and KV cache see: heads and KV heads divided by N."""
    check_tensor_parallel(config, world_size)
    return config.replace(num_heads=config.num_heads // world_size,
                          num_kv_heads=config.num_kv_heads // world_size)


def split_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's share of `size`: ceil(size / N) each, the last one shorter.

    Example: size 10, N 3 -> (0, 4), (4, 8), (8, 10). Equal-sized shares (but the last) let
    the output head pad its logits to one size for the all-gather.
    """
    share = -(-size // world_size)
    start = min(size, rank * share)
    return start, min(size, start + share)


def shard_plan(config: ModelConfig, rank: int, world_size: int) -> dict[str, ShardSlice | None]:
    """Every tensor the model loads (HF names) -> the slice this rank holds (None: all of it).

    Worked example, SmolLM2 (9 heads, 3 KV heads, head_dim 64, FFN 1536, vocab 49152) at
    N = 3, rank 1: q_proj rows [192, 384) (heads 3-5), k/v_proj rows [64, 128) (KV head 1),
    o_proj columns [192, 384), gate/up rows [512, 1024), down columns [512, 1024),
    embed_tokens rows [16384, 32768). Query heads 3-5 use KV head 1 (GQA groups of 3), so
    each rank's heads attend to its own KV heads only.
    """
    local = rank_config(config, world_size)
    q_rows = local.num_heads * config.head_dim
    kv_rows = local.num_kv_heads * config.head_dim
    ffn = split_range(config.ffn_dim, rank, world_size)
    per_layer = {
        "self_attn.q_proj": ShardSlice(0, rank * q_rows, (rank + 1) * q_rows),
        "self_attn.k_proj": ShardSlice(0, rank * kv_rows, (rank + 1) * kv_rows),
        "self_attn.v_proj": ShardSlice(0, rank * kv_rows, (rank + 1) * kv_rows),
        "self_attn.o_proj": ShardSlice(1, rank * q_rows, (rank + 1) * q_rows),
        "mlp.gate_proj": ShardSlice(0, *ffn),
        "mlp.up_proj": ShardSlice(0, *ffn),
        "mlp.down_proj": ShardSlice(1, *ffn),
    }
    vocab = ShardSlice(0, *split_range(config.vocab_size, rank, world_size))
    plan: dict[str, ShardSlice | None] = {}
    for name in expected_shapes(config):
        module = name.removesuffix(".weight")
        suffix = module.split(".", 3)[-1] if name.startswith("model.layers.") else module
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            plan[name] = vocab
        else:
            plan[name] = per_layer.get(suffix)
    return plan


class ColumnParallelLinear(nn.Module):
    """This rank's output rows of a linear layer: y[..., rows] = x @ W[rows].T, no comms."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out / N, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """This rank's input columns of a linear layer, partial outputs summed over ranks."""

    def __init__(self, weight: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in / N]
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in / N] (this rank's heads or FFN share) -> [..., out], summed over ranks
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_start + rows); other ids embed as zeros, then summed."""

    def __init__(self, weight: torch.Tensor, vocab_start: int,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab / N, dim]
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out, group=self.group)
        return out


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, all-gathered into the full row on every rank."""

    def __init__(self, weight: nn.Parameter, *, vocab_size: int, world_size: int,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = weight  # [vocab / N, dim]; the embedding's own Parameter when tied
        self.vocab_size = vocab_size
        self.share = -(-vocab_size // world_size)  # see split_range
        self.world_size = world_size
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [..., rows]
        if local.shape[-1] < self.share:  # the last rank's shorter slice: pad to gather
            local = F.pad(local, (0, self.share - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]  # [..., vocab]


def parallelize(config: ModelConfig, shards: dict[str, torch.Tensor], *, rank: int,
                world_size: int, group: dist.ProcessGroup | None = None,
                device: str | torch.device = "cpu") -> Transformer:
    """One rank's Transformer from its weight slices (`shard_plan`'s tensors, HF names).

    The model is built on the meta device, its linears and embeddings swapped for the
    parallel ones above holding `shards`' tensors (no copy), its norms loaded whole.
    """
    local = rank_config(config, world_size)
    with torch.device("meta"):
        model = Transformer(config)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        for path in COLUMN_PARALLEL:
            _swap(layer, path, ColumnParallelLinear(shards[f"{prefix}{path}.weight"]))
        for path in ROW_PARALLEL:
            _swap(layer, path, RowParallelLinear(shards[f"{prefix}{path}.weight"], group))
        layer.self_attn.num_heads = local.num_heads
        layer.self_attn.num_kv_heads = local.num_kv_heads
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight = nn.Parameter(shards[f"{prefix}{norm}.weight"],
                                                       requires_grad=False)
    model.model.norm.weight = nn.Parameter(shards["model.norm.weight"], requires_grad=False)
    vocab_start, _ = split_range(config.vocab_size, rank, world_size)
    embed = VocabParallelEmbedding(shards["model.embed_tokens.weight"], vocab_start, group)
    model.model.embed_tokens = embed
    head_weight = embed.weight if config.tie_embeddings else nn.Parameter(
        shards["lm_head.weight"], requires_grad=False)
    model.lm_head = ParallelLMHead(head_weight, vocab_size=config.vocab_size,
                                   world_size=world_size, group=group)
    model.rope_cos, model.rope_sin = rotary_table(config, config.max_seq_len)
    model.config = local
    model.parallel = ParallelInfo(rank, world_size, config)
    return model.to(device).eval()


def _swap(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, child = path.split(".")
    setattr(getattr(layer, parent_name), child, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (a tied weight counted once): what this rank holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
