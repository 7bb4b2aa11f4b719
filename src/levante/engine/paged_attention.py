"""Paged attention: block tables to slots and masks for one step, and attention over the pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from levante.engine.flex_attention import FlexKernel, FlexStep, build_flex_step
from levante.engine.kv_cache import KVCache, dequantize_q8_0
from levante.quant import kernels


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
            in_place = kernels.paged_attention(
                q.contiguous(), cache.keys[layer_idx], cache.values[layer_idx], self.block_tables,
                self.context_lens, self.query_lens, block_size=cache.block_size,
                k_scales=k_scales, v_scales=v_scales)
            if in_place is not None:
                return in_place
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
