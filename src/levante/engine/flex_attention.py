"""FlexAttention over the paged KV pool: a block mask built from the block tables, no gather.

The SDPA path copies every sequence's blocks out of the pool for every layer of every step.
Here the pool itself is the key/value tensor ([1, kv_heads, slots, head_dim], a view), and a
`BlockMask` tells FlexAttention which physical blocks each sequence's query tile reads: the
sequence's own block-table row, in logical order, up to the block of the tile's last position.
Inside those blocks a mask_mod maps a physical slot back to its logical position (the reverse
of the block table) for the causal test. The mask is built once per step and serves every
layer. This is the scheme of PyTorch's paged-attention example (attention-gym, gpt-fast).

Worked example, block_size 4, pool of 8 blocks, one sequence with block table [7, 2] and 5
cached tokens adding 1 (position 5): its one query tile lists physical blocks [7, 2]
(logical 0, 1: position 5 is in block 5 // 4 = 1). physical_to_logical[0] is
[-1, -1, 1, -1, -1, -1, -1, 0]; slot 9 = block 2, offset 1 -> logical position 1 * 4 + 1 = 5
<= 5: attended; slot 10 -> position 6 > 5: masked; slots of block 3 -> logical -1: masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Q_BLOCK = 128  # query rows per block-mask tile
MIN_GPU_KV_BLOCK = 16  # the Triton kernel's smallest key tile (BLOCK_N)


def is_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention, 2.5+)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(*, device_type: str, block_size: int, kv_dtype: str,
                       activation_dtype: torch.dtype) -> str | None:
    """Why the flex path cannot run here (a sentence), or None where it can."""
    if not is_available():
        return f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention"
    pool = str(activation_dtype).removeprefix("torch.")
    if kv_dtype != pool:
        return (f"it reads the KV pool in place, so the pool must be stored in the activations' "
                f"dtype {pool}, not {kv_dtype}")
    if device_type == "cuda" and block_size % MIN_GPU_KV_BLOCK:
        return f"its GPU kernel needs a block_size divisible by {MIN_GPU_KV_BLOCK}, got {block_size}"
    return None


@dataclass(frozen=True)
class FlexKernel:
    """The FlexAttention callable a runner keeps for its life: compiled on CUDA, else eager.

    Eager FlexAttention (CPU tests) materializes the whole [B, H, Q, slots] score matrix and
    ignores the block list (only the mask_mod); compiled, it reads only the listed blocks.
    """

    attention: Callable[..., torch.Tensor]
    is_compiled: bool

    @classmethod
    def for_device(cls, device: torch.device) -> FlexKernel:
        """torch.compile(flex_attention) on CUDA (it is only fast compiled), else eager."""
        from torch.nn.attention.flex_attention import flex_attention

        if device.type == "cuda":
            raise_recompile_limit()
            return cls(torch.compile(flex_attention, dynamic=True), is_compiled=True)
        return cls(flex_attention, is_compiled=False)


RECOMPILE_LIMIT = 64


def raise_recompile_limit() -> None:
    """Let torch.compile keep up to RECOMPILE_LIMIT variants of one function (PyTorch: 8).

    Every engine in a process compiles the same `flex_attention` code, so the variants (one per
    KV dtype, head shape, block size... ) add up across engines: a test session, or models
    loaded one after another. Past the limit PyTorch runs flex eagerly without a word, through
    a path that a CUDA graph cannot capture (an H200 test session failed so on its 9th engine).
    vLLM raises the same limit for the same reason.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


@dataclass(frozen=True)
class FlexStep:
    """One step's block mask and kernel options, shared by every layer."""

    kernel: FlexKernel
    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask
    kernel_options: dict[str, Any]

    def attend(self, queries: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> torch.Tensor:
        """queries [B, H, Q, D] over the pool's keys/values [slots, KV, D] -> [B, H, Q, D]."""
        k = keys.permute(1, 0, 2).unsqueeze(0)  # [1, KV, slots, D], a view: no copy
        v = values.permute(1, 0, 2).unsqueeze(0)
        return self.kernel.attention(queries, k, v, block_mask=self.block_mask, enable_gqa=True,
                                     kernel_options=self.kernel_options or None)


def build_flex_step(kernel: FlexKernel, *, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: torch.Tensor, num_blocks: int,
                    block_size: int, max_query_len: int) -> FlexStep:
    """The block mask for B sequences whose queries are padded to [B, H, max_query_len, D].

    block_tables [B, max_blocks] (padded with 0), context_lens and query_lens [B], all on the
    device. Query row r of sequence b sits at position context_lens[b] - query_lens[b] + r.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = block_tables.device
    num_seqs, max_blocks = block_tables.shape
    starts = context_lens - query_lens  # [B] position of each sequence's first query
    num_tiles = -(-max_query_len // Q_BLOCK)
    tile_first = torch.arange(num_tiles, device=device) * Q_BLOCK  # [tiles]
    tile_last = torch.minimum(tile_first[None, :] + Q_BLOCK, query_lens[:, None]) - 1  # [B, tiles]
    # A tile reads logical blocks 0 .. (its last query's position) // block_size.
    kv_num_blocks = torch.where(tile_first[None, :] < query_lens[:, None],
                                (starts[:, None] + tile_last) // block_size + 1, 0)
    kv_indices = block_tables[:, None, None, :].expand(num_seqs, 1, num_tiles, max_blocks)
    mask_mod = _paged_causal_mask(block_tables, context_lens, starts, query_lens,
                                  num_blocks=num_blocks, block_size=block_size)
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks[:, None].to(torch.int32), kv_indices.to(torch.int32).contiguous(),
        BLOCK_SIZE=(Q_BLOCK, block_size), mask_mod=mask_mod,
        seq_lengths=(max_query_len, num_blocks * block_size), compute_q_blocks=False)
    options: dict[str, Any] = {}
    if kernel.is_compiled:  # key tiles no larger than a KV block; the kernel checks divisibility
        options = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_N": min(block_size & -block_size, 64),
                   "BLOCK_M": 16 if max_query_len <= 16 else 64}
    return FlexStep(kernel, block_mask, options)


def _paged_causal_mask(block_tables: torch.Tensor, context_lens: torch.Tensor,
                       starts: torch.Tensor, query_lens: torch.Tensor, *, num_blocks: int,
                       block_size: int) -> Callable[..., torch.Tensor]:
    """mask_mod over physical slots: the slot is in one of b's blocks at a position <= q's."""
    num_seqs, max_blocks = block_tables.shape
    device = block_tables.device
    num_used = (context_lens + block_size - 1) // block_size  # [B] blocks each sequence holds
    logical = torch.arange(max_blocks, device=device).expand(num_seqs, -1)
    # Padding entries of the table (block id 0) point at a spare column, dropped after.
    targets = torch.where(logical < num_used[:, None], block_tables, num_blocks)
    physical_to_logical = torch.full((num_seqs, num_blocks + 1), -1, dtype=torch.long,
                                     device=device)
    physical_to_logical.scatter_(1, targets, logical.contiguous())
    physical_to_logical = physical_to_logical[:, :num_blocks].contiguous()  # [B, num_blocks]

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        block = physical_to_logical[b, kv_idx // block_size]
        position = block * block_size + kv_idx % block_size
        return (block >= 0) & (position <= starts[b] + q_idx) & (q_idx < query_lens[b])

    return mask_mod
