"""FlexAttention over the paged pool (eager on CPU) equals the gather + SDPA path and plain
attention; its block mask lists exactly the blocks the mask_mod lets each query tile read."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from levante.config import EngineConfig, ModelConfig
from levante.engine import flex_attention
from levante.engine.engine import Engine
from levante.engine.flex_attention import FlexKernel
from levante.engine.kv_cache import KVCache
from levante.engine.paged_attention import build_paged_attention
from levante.engine.runner import resolve_attention_backend
from levante.engine.sampling_params import SamplingParams
from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant import kernels

pytestmark = [
    pytest.mark.skipif(not flex_attention.is_available(), reason="this torch has no FlexAttention"),
    # Eager FlexAttention on CPU is the point here (CUDA compiles it).
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

# GQA 4:1 as Mistral Small 3, tiny widths.
CONFIG = ModelConfig(vocab_size=64, dim=32, num_layers=1, num_heads=8, num_kv_heads=2,
                     head_dim=16, ffn_dim=64, max_seq_len=512)
BLOCK_SIZE = 4
# (context length, new tokens): a prefill chunk after cached tokens, decodes, a whole prompt,
# and a prompt longer than one 128-row query tile.
SEQUENCES = [(37, 20), (5, 1), (23, 23), (9, 1), (16, 1), (150, 140)]


def _problem(dtype: torch.dtype, seed: int = 0
             ) -> tuple[KVCache, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool full of noise (other sequences' blocks must not leak in), random non-contiguous
    block tables, and the step's new q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(CONFIG, num_blocks=96, block_size=BLOCK_SIZE, dtype=dtype)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    order = torch.randperm(cache.num_blocks, generator=gen).tolist()
    tables = []
    for context_len, _ in SEQUENCES:
        tables.append(order[:-(-context_len // BLOCK_SIZE)])
        order = order[len(tables[-1]):]
    step = dict(block_tables=tables, context_lens=[c for c, _ in SEQUENCES],
                query_lens=[n for _, n in SEQUENCES])
    num_tokens = sum(n for _, n in SEQUENCES)
    q = torch.randn(num_tokens, CONFIG.num_heads, CONFIG.head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(num_tokens, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen)
            .to(dtype) for _ in range(2))
    return cache, step, q, k, v


def _reference(cache: KVCache, step: dict, q: torch.Tensor) -> torch.Tensor:
    """Plain causal attention per sequence in float64, over its blocks read by position."""
    outs, row = [], 0
    group = CONFIG.num_heads // CONFIG.num_kv_heads
    for table, context_len, query_len in zip(step["block_tables"], step["context_lens"],
                                             step["query_lens"]):
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(context_len)]
        keys = cache.keys[0][slots].double().repeat_interleave(group, dim=1)  # [L, H, D]
        values = cache.values[0][slots].double().repeat_interleave(group, dim=1)
        queries = q[row:row + query_len].double()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", queries, keys) / math.sqrt(CONFIG.head_dim)
        positions = torch.arange(context_len - query_len, context_len)
        allowed = torch.arange(context_len)[None, :] <= positions[:, None]  # [n, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values))
        row += query_len
    return torch.cat(outs)


def test_flex_equals_sdpa_gather_and_plain_attention() -> None:
    cache, step, q, k, v = _problem(torch.float32)
    flex = build_paged_attention(cache, **step, flex=FlexKernel.for_device(torch.device("cpu")))
    out_flex = flex.attend(0, q, k, v)  # writes the new K/V first, as every backend does
    sdpa = build_paged_attention(cache, **step, use_cpu_kernel=False)
    out_sdpa = sdpa.attend(0, q, k, v)
    expected = _reference(cache, step, q)
    assert out_flex.shape == q.shape
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_flex.double(), expected, atol=1e-5, rtol=1e-5)


def test_decode_only_step() -> None:
    """One new token per sequence: the unpadded layout (no query index)."""
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(CONFIG, num_blocks=32, block_size=BLOCK_SIZE, dtype=torch.float32)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    step = dict(block_tables=[[30, 2, 17], [5], [9, 8]], context_lens=[11, 3, 8],
                query_lens=[1, 1, 1])
    q = torch.randn(3, CONFIG.num_heads, CONFIG.head_dim, generator=gen)
    k, v = (torch.randn(3, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen) for _ in range(2))
    flex = build_paged_attention(cache, **step, flex=FlexKernel.for_device(torch.device("cpu")))
    out = flex.attend(0, q, k, v)
    torch.testing.assert_close(out.double(), _reference(cache, step, q), atol=1e-5, rtol=1e-5)


def test_sixteen_bit_pool() -> None:
    """A bfloat16 pool read in place by bfloat16 queries, as on a GPU."""
    cache, step, q, k, v = _problem(torch.bfloat16, seed=5)
    flex = build_paged_attention(cache, **step, flex=FlexKernel.for_device(torch.device("cpu")))
    out = flex.attend(0, q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(cache, step, q), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_block", [128, 8])
def test_block_mask_lists_exactly_the_blocks_the_mask_reads(
        monkeypatch: pytest.MonkeyPatch, q_block: int) -> None:
    """Eager FlexAttention applies only the mask_mod; compiled, only listed blocks are read.
    So each query tile's listed physical blocks must be exactly those where the mask_mod
    allows some entry: no block of another sequence, none missing."""
    from torch.nn.attention.flex_attention import create_mask

    monkeypatch.setattr(flex_attention, "Q_BLOCK", q_block)
    cache, step, *_ = _problem(torch.float32)
    attention = build_paged_attention(cache, **step,
                                      flex=FlexKernel.for_device(torch.device("cpu")))
    assert attention.flex is not None
    block_mask = attention.flex.block_mask
    num_seqs, max_q = len(SEQUENCES), attention.max_query_len
    dense = create_mask(block_mask.mask_mod, num_seqs, 1, max_q,
                        cache.num_blocks * BLOCK_SIZE)[:, 0]  # [B, Q, slots]
    num_tiles = -(-max_q // q_block)
    assert block_mask.kv_indices.shape[:3] == (num_seqs, 1, num_tiles)
    for b in range(num_seqs):
        for tile in range(num_tiles):
            rows = dense[b, tile * q_block:(tile + 1) * q_block]  # [rows, slots]
            read = rows.view(rows.shape[0], cache.num_blocks, BLOCK_SIZE).any(-1).any(0)
            count = int(block_mask.kv_num_blocks[b, 0, tile])
            listed = block_mask.kv_indices[b, 0, tile, :count].tolist()
            assert sorted(listed) == read.nonzero().flatten().tolist(), (b, tile)
            assert set(listed) <= set(step["block_tables"][b])


def test_forced_flex_needs_the_pool_in_the_activations_dtype() -> None:
    model = Transformer(CONFIG).eval()
    config = EngineConfig(max_model_len=64, num_kv_blocks=16, block_size=4,
                          attention_backend="flex", kv_cache_dtype="float16")
    with pytest.raises(ConfigError, match="flex"):
        Engine(model, None, config)
    with pytest.raises(ConfigError, match="attention_backend"):
        EngineConfig(attention_backend="triton")


def test_auto_backend_on_cpu_is_the_kernel_in_float32_else_sdpa() -> None:
    cache = KVCache(CONFIG, num_blocks=4, block_size=4, dtype=torch.bfloat16)
    half = Transformer(CONFIG).to(torch.bfloat16).eval()
    assert resolve_attention_backend("auto", half, cache) == "sdpa"
    assert resolve_attention_backend("flex", half, cache) == "flex"
    if kernels.available():
        assert resolve_attention_backend("auto", Transformer(CONFIG).eval(), cache) == "cpu_kernel"
    with pytest.raises(ConfigError, match="cpu_kernel"):
        resolve_attention_backend("cpu_kernel", half, cache)


def test_engine_greedy_tokens_with_flex_equal_the_default(
        model: Transformer, caplog: pytest.LogCaptureFixture) -> None:
    """Chunked prefill mixed with decodes (a 32-token budget), several lengths, float32 pool."""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()
               for n in (5, 40, 17, 29)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("auto", "flex"):
        config = EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=8,
                              max_num_batched_tokens=32, kv_cache_dtype="float32",
                              attention_backend=backend)
        with caplog.at_level(logging.INFO, logger="levante.engine.runner"):
            engine = Engine(model, None, config)
        ids = [engine.add_request(p, params) for p in prompts]
        outs = engine.run_to_completion(ids)
        tokens[backend] = [[t for o in outs[r] for t in o.new_token_ids] for r in ids]
    assert engine.runner.attention_backend == "flex"
    assert "attention: FlexAttention over the paged pool" in caplog.text
    assert tokens["flex"] == tokens["auto"]
