"""The KV pool: per-layer K/V tensors over a fixed number of blocks, and their storage dtype."""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

from levante.config import KV_BYTES_PER_VALUE, ModelConfig
from levante.load_config import dtype_name

# How the pool stores K and V: a float dtype, or "q8_0" (int8 values with one float16 scale
# per 32, llama.cpp's 8-bit KV cache: 34 bytes per 32 values, 53% of 16-bit).
KV_STORAGE: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                      "float16": torch.float16, "q8_0": torch.int8}
Q8_BLOCK = 32  # values per q8_0 scale


def kv_storage_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> "bfloat16"; a name of KV_STORAGE passes through."""
    if isinstance(dtype, str):
        if dtype not in KV_STORAGE:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_STORAGE)}, "
                             f"got {dtype!r}")
        return dtype
    return dtype_name(dtype)


def kv_bytes_per_value(dtype: torch.dtype | str) -> float:
    """Bytes one cached K or V value takes: 4, 2, or 34 / 32 for q8_0."""
    return KV_BYTES_PER_VALUE[kv_storage_name(dtype)]


class KVCache:
    """K and V for every layer: each [num_blocks * block_size, num_kv_heads, head_dim].

    `dtype` is the storage (`KV_STORAGE`); values written are converted to it, and attention
    reads them back as the queries' dtype. A q8_0 cache also keeps float16 scales
    [slots, num_kv_heads, head_dim / 32] per layer for K and V.
    """

    def __init__(self, config: ModelConfig, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype | str, device: torch.device | str = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_dtype = kv_storage_name(dtype)
        storage = KV_STORAGE[self.kv_dtype]
        if self.kv_dtype == "q8_0" and config.head_dim % Q8_BLOCK:
            raise ValueError(f"a q8_0 KV cache needs head_dim divisible by {Q8_BLOCK}, got "
                             f"{config.head_dim}")
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        layers = range(config.num_layers)
        self.keys = [_untouched_zeros(shape, storage, device) for _ in layers]
        self.values = [_untouched_zeros(shape, storage, device) for _ in layers]
        self.key_scales: list[torch.Tensor] | None = None
        self.value_scales: list[torch.Tensor] | None = None
        if self.kv_dtype == "q8_0":
            scale_shape = (*shape[:2], config.head_dim // Q8_BLOCK)
            self.key_scales = [_untouched_zeros(scale_shape, torch.float16, device)
                               for _ in layers]
            self.value_scales = [_untouched_zeros(scale_shape, torch.float16, device)
                                 for _ in layers]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype | str) -> int:
        """Bytes one block takes over all layers, K and V (q8_0 scales included)."""
        values = config.kv_bytes_per_token(1) * block_size  # K and V values, all layers
        return math.ceil(values * kv_bytes_per_value(dtype))

    def scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer `layer_idx`'s q8_0 scales for K and V; (None, None) for a float pool."""
        if self.key_scales is None or self.value_scales is None:
            return None, None
        return self.key_scales[layer_idx], self.value_scales[layer_idx]

    def write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new K/V rows [T, KV, D] at `slots` [T], converted to the storage."""
        if self.kv_dtype != "q8_0":
            self.keys[layer_idx].index_copy_(0, slots, k.to(self.keys[layer_idx].dtype))
            self.values[layer_idx].index_copy_(0, slots, v.to(self.values[layer_idx].dtype))
            return
        assert self.key_scales is not None and self.value_scales is not None
        for x, cache, scales in ((k, self.keys, self.key_scales),
                                 (v, self.values, self.value_scales)):
            q, d = quantize_q8_0(x)
            cache[layer_idx].index_copy_(0, slots, q)
            scales[layer_idx].index_copy_(0, slots, d)


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> int8 [..., D] and float16 scales [..., D / 32], as llama.cpp's q8_0:
    d = max|x| / 127 per 32 values, q = round(x / d) (halves away from zero)."""
    blocks = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    scaled = blocks * inverse
    q = scaled.abs().add_(0.5).floor_().copysign_(scaled).to(torch.int8)
    return q.flatten(-2), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and float16 scales [..., D / 32] -> values [..., D] in `dtype`."""
    values = q.float().unflatten(-1, (-1, Q8_BLOCK)) * scales.float().unsqueeze(-1)
    return values.flatten(-2).to(dtype)


def _untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device | str) -> torch.Tensor:
    """Zeros whose pages are not written before use (CPU), so an idle pool costs no RSS.

    torch.zeros fills every page at once: a pool sized for many sequences x the full context
    became resident before the first token. An anonymous memory map is zero pages that the
    OS backs only when a block is first written. (calloc, e.g. numpy's zeros, does that only
    when malloc maps the block afresh; served from a free heap chunk, it clears, and so
    writes, every page: measured peaks of one SmolLM2 run varied by 100 MB with it.) Unused
    slots must read as zeros (never NaN): attention reads whole blocks and masks the tail.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)  # unmapped when freed
    return torch.from_numpy(pages).view(dtype).view(shape)
