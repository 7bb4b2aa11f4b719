"""Paged KV cache: a fixed pool of blocks, per-layer K/V tensors, and attention over them."""

from __future__ import annotations

import hashlib
import math
import mmap
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from levante.config import KV_BYTES_PER_VALUE, ModelConfig
from levante.engine.flex_attention import FlexKernel, FlexStep, build_flex_step
from levante.load_config import dtype_name
from levante.quant import kernels


class BlockPool:
    """Allocator of KV block ids with reference counts and an optional prefix cache.

    With caching on, a full block is registered under the hash of its whole token prefix.
    When its last holder frees it, it keeps its contents and its hash while it waits in the
    free list (least recently freed first out); a later request whose prompt starts with the
    same tokens takes it back instead of recomputing it. Reallocating it drops the hash.
    """

    def __init__(self, num_blocks: int, *, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks, or None (and nothing taken) if the pool has fewer free."""
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free list."""
        for block in reversed(blocks):  # tail blocks first: evicted before the shared head
            assert self._refs[block] > 0, f"block {block} freed twice"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that `block` holds the full block whose prefix hashes to `block_hash`."""
        if not self.enable_caching or block_hash in self._by_hash:
            return
        self._forget(block)
        self._hash_of[block] = block_hash
        self._by_hash[block_hash] = block

    def unregister(self, block: int, block_hash: bytes) -> None:
        """Drop `block` from the prefix cache if it is the block registered under the hash."""
        if self._by_hash.get(block_hash) == block:
            self._forget(block)

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of `block_hashes`, each with a reference taken."""
        hits = []
        for digest in block_hashes if self.enable_caching else ():
            block = self._by_hash.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            hits.append(block)
        return hits

    def _forget(self, block: int) -> None:
        old = self._hash_of[block]
        if old is not None:
            del self._by_hash[old]
            self._hash_of[block] = None


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block given its parent's hash: it names the whole prefix, not the block.

    A cryptographic hash (blake2b), so no prompt can be crafted to collide with another's.
    """
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


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


@dataclass(frozen=True)
class PagedAttention:
    """Attention metadata for one step, and the `AttentionBackend` the model calls with it.

    A step holds B sequences; sequence b brings `query_lens[b]` new tokens at positions
    `[context_lens[b] - query_lens[b], context_lens[b])`. The T = sum(query_lens) new tokens are
    flattened in sequence order. Worked example, block_size 4, one sequence with block table
    [7, 2] and 5 cached tokens, adding 1 token: its position is 5, block 5 // 4 = 1 -> id 2,
    offset 5 % 4 = 1, so its slot is 2 * 4 + 1 = 9; it attends to slots
    [28, 29, 30, 31, 8, 9] (positions 0..5).
    """

    cache: KVCache
    slot_mapping: torch.Tensor  # [T] cache slot for each new token's K/V
    block_tables: torch.Tensor  # [B, max_blocks] block ids (padded with 0)
    context_lens: torch.Tensor  # [B] int64: keys each sequence attends to, its new ones included
    query_lens: torch.Tensor  # [B] int64: new tokens of each sequence, 1 .. its context length
    context_len: int  # L: the longest context; keys past a sequence's own are masked
    mask: torch.Tensor | None  # [B, 1, Q, L] True where a query may attend; None: decode-only
    query_index: torch.Tensor | None  # [T] index into the padded [B * Q] query grid
    num_seqs: int
    max_query_len: int
    use_cpu_kernel: bool = True  # the compiled CPU kernel where it applies (float32 on CPU)
    flex: FlexStep | None = None  # FlexAttention's block mask for this step (flex backend)

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Each sequence's keys or values, whole blocks at a time: [B, kv_heads, L, head_dim].

        One `index_select` of block rows: a row gather of ~block_size * kv_heads * head_dim
        contiguous values each. (Indexing per slot, `cache[slots]`, took 5.6 of a 9.4 ms
        SmolLM2 decode step at 500 tokens of context on 2 cores.)
        """
        rows = cache.view(self.cache.num_blocks, -1).index_select(0, self.block_tables.view(-1))
        rows = rows.view(self.num_seqs, -1, *cache.shape[1:])  # [B, max_blocks * bs, kv, hd]
        return rows[:, :self.context_len].transpose(1, 2)

    def _gather_as(self, cache: torch.Tensor, scales: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
        """`_gather`, then converted (or q8_0-dequantized) to `dtype`: only the rows read."""
        rows = self._gather(cache)
        if scales is None:
            return rows.to(dtype)
        return dequantize_q8_0(rows, self._gather(scales), dtype)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Write the new K/V into the cache, then attend over each sequence's whole context.

        With `use_cpu_kernel`, in float32 on CPU every step (decode, prefill chunks, draft
        verification, any mix) reads the blocks in place with the compiled kernel (a 16-bit or
        q8_0 pool widened to float32 as it is read), where a token's result is
        bit-identical to a decode of that token alone: it depends on neither its neighbours,
        nor the chunking, nor a prefix-cache hit. With 8-bit activations downstream, the float
        noise SDPA's row count and chunking gave flipped near-tie greedy tokens. With `flex`
        (it comes first) FlexAttention reads the pool in place through a block mask (GPU).
        Otherwise (other devices and dtypes, no compiler) each sequence's blocks are gathered
        for SDPA.
        """
        cache = self.cache
        cache.write(layer_idx, self.slot_mapping, k, v)
        k_scales, v_scales = cache.scales(layer_idx)
        if self.flex is not None:
            assert k_scales is None, "the flex backend reads a float pool (runner checks)"
            out = self.flex.attend(self._padded_queries(q), cache.keys[layer_idx],
                                   cache.values[layer_idx])
            return self._unpadded(out)
        if self.use_cpu_kernel and q.device.type == "cpu" and q.dtype == torch.float32:
            out = kernels.paged_attention(
                q.contiguous(), cache.keys[layer_idx], cache.values[layer_idx], self.block_tables,
                self.context_lens, self.query_lens, block_size=cache.block_size,
                k_scales=k_scales, v_scales=v_scales)
            if out is not None:
                return out
        queries = self._padded_queries(q)  # [B, heads, Q, head_dim]
        keys = self._gather_as(cache.keys[layer_idx], k_scales, q.dtype)
        values = self._gather_as(cache.values[layer_idx], v_scales, q.dtype)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask,
                                             enable_gqa=True)
        return self._unpadded(out)

    def _padded_queries(self, q: torch.Tensor) -> torch.Tensor:
        """[T, heads, head_dim] -> [B, heads, Q, head_dim], each sequence's rows from 0."""
        b, qn = self.num_seqs, self.max_query_len
        if self.query_index is None:  # one new token per sequence, in order
            return q.view(b, 1, *q.shape[1:]).transpose(1, 2)
        padded = q.new_zeros(b * qn, *q.shape[1:])
        padded[self.query_index] = q
        return padded.view(b, qn, *q.shape[1:]).transpose(1, 2)

    def _unpadded(self, out: torch.Tensor) -> torch.Tensor:
        """`_padded_queries` undone: [B, heads, Q, head_dim] -> [T, heads, head_dim]."""
        out = out.transpose(1, 2).reshape(self.num_seqs * self.max_query_len, out.shape[1],
                                          out.shape[3])
        return out if self.query_index is None else out[self.query_index]


def build_paged_attention(cache: KVCache, *, block_tables: list[list[int]],
                          context_lens: list[int], query_lens: list[int],
                          device: torch.device | str = "cpu", use_cpu_kernel: bool = True,
                          flex: FlexKernel | None = None) -> PagedAttention:
    """Index tensors for a step (see `PagedAttention` for the layout).

    `use_cpu_kernel` False forces the gather + SDPA path on CPU; `flex` attends with
    FlexAttention through a block mask instead of gathering (see `flex_attention`).
    """
    bs = cache.block_size
    num_seqs = len(context_lens)
    max_len = max(context_lens)
    max_q = max(query_lens)
    max_blocks = max(len(t) for t in block_tables)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    qlen = torch.tensor(query_lens, dtype=torch.long)
    pos = torch.arange(max_len)
    key_slots = table.gather(1, (pos // bs).clamp(max=max_blocks - 1).expand(num_seqs, -1))
    key_slots = key_slots * bs + pos % bs  # [B, L]
    key_valid = pos[None, :] < ctx[:, None]  # [B, L]
    key_slots = torch.where(key_valid, key_slots, 0)
    # Query q of sequence b sits at position ctx[b] - qlen[b] + q.
    q_idx = torch.arange(max_q)
    q_valid = q_idx[None, :] < qlen[:, None]  # [B, Q]
    q_pos = ctx[:, None] - qlen[:, None] + q_idx[None, :]  # [B, Q]
    new_slots = key_slots.gather(1, q_pos.clamp(min=0, max=max_len - 1))
    slot_mapping = new_slots[q_valid]  # [T], in sequence order
    if max_q == 1:
        mask = key_valid[:, None, None, :] if min(context_lens) < max_len else None
        query_index = None
    else:
        # Padded query rows attend to key 0 only, so no row is fully masked (no NaN).
        q_pos = torch.where(q_valid, q_pos, 0)
        mask = (pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        mask = mask[:, None]
        query_index = (torch.arange(num_seqs * max_q).view(num_seqs, max_q))[q_valid]
        query_index = query_index.to(device)
    table, ctx, qlen = table.to(device), ctx.to(device), qlen.to(device)
    step = None
    if flex is not None:
        mask = None  # the block mask replaces the dense one
        step = build_flex_step(flex, block_tables=table, context_lens=ctx, query_lens=qlen,
                               num_blocks=cache.num_blocks, block_size=bs, max_query_len=max_q)
    return PagedAttention(
        cache=cache, slot_mapping=slot_mapping.to(device), block_tables=table, context_lens=ctx,
        query_lens=qlen, context_len=max_len, mask=None if mask is None else mask.to(device),
        query_index=query_index, num_seqs=num_seqs, max_query_len=max_q,
        use_cpu_kernel=use_cpu_kernel, flex=step)
