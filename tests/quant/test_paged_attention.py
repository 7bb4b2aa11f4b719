"""The paged attention kernels against gathered keys and PyTorch's SDPA, and prefill rows against
decode rows bit for bit (batch invariance)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from levante.config import ModelConfig
from levante.engine.kv_cache import KVCache, dequantize_q8_0, quantize_q8_0
from levante.engine.paged_attention import build_paged_attention
from levante.quant import kernels

# Lengths around block edges for block_size 16, plus a few hundred.
CONTEXT_LENS = [1, 15, 16, 17, 300]


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    if not kernels.available():
        pytest.skip("the C++ kernels could not be built here (no compiler?)")


def random_problem(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   context_lens: list[int], *, seed: int = 0) -> dict:
    """Random caches with spare blocks and shuffled tables, padded with 0 past each context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + 3  # blocks nobody reads hold noise too
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max(blocks_needed) + 1, dtype=torch.long)
    for b, count in enumerate(blocks_needed):
        tables[b, :count] = torch.tensor(order[:count])
        order = order[count:]
    return {"q": torch.randn(len(context_lens), num_heads, head_dim, generator=gen),
            "k_cache": k_cache, "v_cache": torch.randn(k_cache.shape, generator=gen),
            "block_tables": tables, "context_lens": torch.tensor(context_lens)}


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """Each sequence's keys gathered slot by slot, then SDPA in float64: [B, H, D]."""
    outs = []
    for b, length in enumerate(context_lens.tolist()):
        pos = torch.arange(length)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        keys, values = (c[slots].transpose(0, 1).double() for c in (k_cache, v_cache))
        out = F.scaled_dot_product_attention(q[b, :, None].double(), keys, values,
                                             enable_gqa=True)  # [H, 1, D]
        outs.append(out[:, 0])
    return torch.stack(outs).float()


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(4, 4, 64), (9, 3, 64), (32, 8, 128), (8, 2, 128), (6, 2, 72),
                          (3, 1, 36)])
def test_matches_gathered_sdpa(num_heads: int, num_kv_heads: int, head_dim: int,
                               block_size: int) -> None:
    """GQA 1:1, 3:1 (SmolLM2) and 4:1 (Mistral Small 3); 72 and 36 take the tail loops."""
    problem = random_problem(num_heads, num_kv_heads, head_dim, block_size, CONTEXT_LENS)
    out = kernels.paged_decode_attention(**problem, block_size=block_size)
    assert out is not None and out.shape == problem["q"].shape
    torch.testing.assert_close(out, reference(**problem, block_size=block_size),
                               rtol=0, atol=1e-5)


def test_large_scores_do_not_overflow() -> None:
    """Scores of ~1e4 (exp would overflow without subtracting the max) stay finite."""
    problem = random_problem(4, 2, 64, 16, [40, 7])
    problem["q"] *= 100.0
    problem["k_cache"] *= 10.0
    out = kernels.paged_decode_attention(**problem, block_size=16)
    assert out is not None and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(**problem, block_size=16), rtol=0, atol=1e-4)


def test_single_thread_equals_parallel() -> None:
    problem = random_problem(9, 3, 64, 16, CONTEXT_LENS * 2)
    parallel = kernels.paged_decode_attention(**problem, block_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = kernels.paged_decode_attention(**problem, block_size=16)
    finally:
        torch.set_num_threads(threads)
    assert parallel is not None and serial is not None
    assert torch.equal(parallel, serial)  # tasks and merge order ignore the thread count


def test_op_schema_and_fake_kernel() -> None:
    """The op traces (torch.compile needs the fake kernel and a correct schema)."""
    p = random_problem(9, 3, 64, 16, [17, 3])
    torch.library.opcheck(torch.ops.levante_quant.paged_decode_attention.default,
                          (p["q"], p["k_cache"], p["v_cache"], p["block_tables"],
                           p["context_lens"], 16, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def bad_inputs() -> list[tuple[str, dict, str]]:
    """(case, changed arguments, expected message) for a 2-sequence problem."""
    p = random_problem(4, 2, 64, 16, [17, 3])
    num_blocks = p["k_cache"].shape[0] // 16
    out_of_range = p["block_tables"].clone()
    out_of_range[0, 1] = num_blocks
    negative = p["block_tables"].clone()
    negative[1, 0] = -1
    return [
        ("block id past the pool", {"block_tables": out_of_range}, "names block"),
        ("negative block id", {"block_tables": negative}, "names block -1"),
        ("context longer than its table", {"context_lens": torch.tensor([17, 49])},
         "context length 49"),
        ("empty context", {"context_lens": torch.tensor([17, 0])}, "context length 0"),
        ("float64 q", {"q": p["q"].double()}, "float32"),
        ("float16 keys, float32 values", {"k_cache": p["k_cache"].half()}, "share a dtype"),
        ("float64 caches", {"k_cache": p["k_cache"].double(), "v_cache": p["v_cache"].double()},
         "float32, bfloat16, float16 or int8"),
        ("int8 caches without scales", {"k_cache": p["k_cache"].to(torch.int8),
                                        "v_cache": p["v_cache"].to(torch.int8)}, "k_scales"),
        ("q8_0 scales of the wrong shape",
         {"k_cache": p["k_cache"].to(torch.int8), "v_cache": p["v_cache"].to(torch.int8),
          "k_scales": torch.zeros(num_blocks * 16, 2, 3, dtype=torch.float16),
          "v_scales": torch.zeros(num_blocks * 16, 2, 2, dtype=torch.float16)}, "scales must"),
        ("int32 tables", {"block_tables": p["block_tables"].int()}, "int64"),
        ("strided q", {"q": p["q"].transpose(0, 1).contiguous().transpose(0, 1)},
         "contiguous"),
        ("heads not a multiple of kv heads", {"q": torch.randn(2, 5, 64)}, "multiple"),
        ("head_dim mismatch", {"q": torch.randn(2, 4, 32)}, "head_dim"),
        ("one length for two sequences", {"context_lens": torch.tensor([17])},
         "context_lens must be"),
        ("tables for one sequence", {"block_tables": p["block_tables"][:1]},
         "block_tables must be"),
        ("v shaped unlike k", {"v_cache": p["v_cache"][:-1]}, "both be"),
    ]


@pytest.mark.parametrize(("case", "changes", "message"), bad_inputs(),
                         ids=[case for case, _, _ in bad_inputs()])
def test_rejects_bad_input(case: str, changes: dict, message: str) -> None:
    problem = {**random_problem(4, 2, 64, 16, [17, 3]), **changes}
    with pytest.raises(RuntimeError, match=message):
        kernels.paged_decode_attention(**problem, block_size=16)


def test_rejects_partial_blocks() -> None:
    problem = random_problem(4, 2, 64, 16, [17, 3])
    with pytest.raises(RuntimeError, match="whole blocks"):
        kernels.paged_decode_attention(**problem, block_size=7)


# --- multi-token queries (prefill chunks, draft verification) -----------------------------

# (context, new tokens) per sequence: chunks of 1..40 at the start, the middle and the end of
# contexts up to 300, across block and task (128-token) edges.
CHUNKS = [(300, 40), (40, 40), (17, 3), (129, 1), (7, 7), (128, 33), (260, 12), (1, 1),
          (200, 25), (33, 16)]


def random_prefill(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   chunks: list[tuple[int, int]], *, seed: int = 0) -> dict:
    """`random_problem` for the contexts, with sum(new tokens) query rows and their lengths."""
    problem = random_problem(num_heads, num_kv_heads, head_dim, block_size,
                             [n for n, _ in chunks], seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    problem["q"] = torch.randn(sum(q for _, q in chunks), num_heads, head_dim, generator=gen)
    problem["query_lens"] = torch.tensor([q for _, q in chunks])
    return problem


def prefill_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      query_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Gathered keys, then SDPA in float64 with a causal mask aligned bottom-right: [T, H, D]."""
    outs, row = [], 0
    for b, (length, num_new) in enumerate(zip(context_lens.tolist(), query_lens.tolist())):
        pos = torch.arange(length)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        keys, values = (c[slots].transpose(0, 1).double() for c in (k_cache, v_cache))
        queries = q[row:row + num_new].transpose(0, 1).double()  # [H, Q, D]
        mask = pos[None, :] <= pos[length - num_new:, None]  # query i at length - Q + i
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                             enable_gqa=True)
        outs.append(out.transpose(0, 1))
        row += num_new
    return torch.cat(outs).float()


def as_decode_rows(problem: dict) -> dict:
    """Each query row of a prefill problem as a sequence of its own: context = position + 1."""
    tables, lens = [], []
    for b, (length, num_new) in enumerate(zip(problem["context_lens"].tolist(),
                                              problem["query_lens"].tolist())):
        tables += [problem["block_tables"][b]] * num_new
        lens += range(length - num_new + 1, length + 1)
    return {**{k: problem[k] for k in ("q", "k_cache", "v_cache")},
            "block_tables": torch.stack(tables), "context_lens": torch.tensor(lens)}


HEAD_SHAPES = [(4, 4, 64), (9, 3, 64), (8, 2, 128), (32, 8, 128), (6, 2, 72), (3, 1, 36)]


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEAD_SHAPES)
def test_prefill_matches_gathered_sdpa(num_heads: int, num_kv_heads: int, head_dim: int,
                                       block_size: int) -> None:
    """GQA 1:1, 3:1 (SmolLM2), 4:1 (Mistral); head_dim 72 and 36 take the tail loops."""
    problem = random_prefill(num_heads, num_kv_heads, head_dim, block_size, CHUNKS)
    out = kernels.paged_attention(**problem, block_size=block_size)
    assert out is not None and out.shape == problem["q"].shape
    torch.testing.assert_close(out, prefill_reference(**problem, block_size=block_size),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEAD_SHAPES)
def test_prefill_rows_equal_decode_rows(num_heads: int, num_kv_heads: int, head_dim: int,
                                        block_size: int) -> None:
    """Bit for bit: a query's result is its one-token decode's, whatever chunk it came in."""
    problem = random_prefill(num_heads, num_kv_heads, head_dim, block_size, CHUNKS)
    out = kernels.paged_attention(**problem, block_size=block_size)
    decoded = kernels.paged_decode_attention(**as_decode_rows(problem), block_size=block_size)
    assert out is not None and decoded is not None
    assert torch.equal(out, decoded)


def test_chunking_does_not_change_a_token() -> None:
    """One 300-token sequence prefilled whole, in uneven chunks, or with neighbours: equal."""
    problem = random_prefill(9, 3, 64, 16, [(300, 300)])
    whole = kernels.paged_attention(**problem, block_size=16)
    assert whole is not None
    start = 0
    for size in (37, 100, 1, 4, 158):
        part = {**problem, "q": problem["q"][start:start + size],
                "context_lens": torch.tensor([start + size]), "query_lens": torch.tensor([size])}
        assert torch.equal(kernels.paged_attention(**part, block_size=16),
                           whole[start:start + size])
        start += size
    # neighbours reading the same blocks (as a shared prefix does), before and after it
    table = problem["block_tables"][0]
    rows = torch.randn(10, 9, 64, generator=torch.Generator().manual_seed(5))
    batch = {**problem, "q": torch.cat([rows[:9], problem["q"], rows[9:]]),
             "block_tables": torch.stack([table] * 3),
             "context_lens": torch.tensor([50, 300, 120]), "query_lens": torch.tensor([9, 300, 1])}
    assert torch.equal(kernels.paged_attention(**batch, block_size=16)[9:309], whole)


def test_long_chunk_runs_in_groups() -> None:
    """Past 2M floats (8 MiB) of per-task partials, tiles run in groups: the same numbers."""
    problem = random_prefill(9, 3, 64, 16, [(1200, 600), (40, 2)])
    out = kernels.paged_attention(**problem, block_size=16)
    decoded = kernels.paged_decode_attention(**as_decode_rows(problem), block_size=16)
    assert torch.equal(out, decoded)
    torch.testing.assert_close(out, prefill_reference(**problem, block_size=16),
                               rtol=0, atol=1e-5)


def test_prefill_single_thread_equals_parallel() -> None:
    problem = random_prefill(9, 3, 64, 16, CHUNKS)
    parallel = kernels.paged_attention(**problem, block_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = kernels.paged_attention(**problem, block_size=16)
    finally:
        torch.set_num_threads(threads)
    assert parallel is not None and torch.equal(parallel, serial)


def test_prefill_op_schema_and_fake_kernel() -> None:
    p = random_prefill(9, 3, 64, 16, [(17, 5), (3, 1)])
    torch.library.opcheck(torch.ops.levante_quant.paged_attention.default,
                          (p["q"], p["k_cache"], p["v_cache"], p["block_tables"],
                           p["context_lens"], p["query_lens"], 16, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def bad_prefill_inputs() -> list[tuple[str, dict, str]]:
    """(case, changed arguments, expected message) for chunks (17, 5) and (3, 1)."""
    p = random_prefill(4, 2, 64, 16, [(17, 5), (3, 1)])
    out_of_range = p["block_tables"].clone()
    out_of_range[0, 1] = p["k_cache"].shape[0] // 16
    return [
        ("query longer than its context", {"query_lens": torch.tensor([5, 4]),
                                           "q": torch.randn(9, 4, 64)}, "query length 4"),
        ("empty query", {"query_lens": torch.tensor([6, 0])}, "query length 0"),
        ("rows unlike query_lens", {"q": p["q"][:5]}, "q has 5 tokens, query_lens add up to 6"),
        ("int32 query_lens", {"query_lens": p["query_lens"].int()}, "query_lens must be"),
        ("query_lens for one sequence", {"query_lens": torch.tensor([6])},
         "block_tables must be"),
        ("2-d q", {"q": p["q"].flatten(1)}, "q must be"),
        ("block id past the pool", {"block_tables": out_of_range}, "names block"),
        ("context longer than its table", {"context_lens": torch.tensor([17, 49])},
         "context length 49"),
        ("float64 q", {"q": p["q"].double()}, "float32"),
        ("strided q", {"q": p["q"].transpose(0, 1).contiguous().transpose(0, 1)},
         "contiguous"),
        ("heads not a multiple of kv heads", {"q": torch.randn(6, 5, 64)}, "multiple"),
    ]


@pytest.mark.parametrize(("case", "changes", "message"), bad_prefill_inputs(),
                         ids=[case for case, _, _ in bad_prefill_inputs()])
def test_prefill_rejects_bad_input(case: str, changes: dict, message: str) -> None:
    problem = {**random_prefill(4, 2, 64, 16, [(17, 5), (3, 1)]), **changes}
    with pytest.raises(RuntimeError, match=message):
        kernels.paged_attention(**problem, block_size=16)


CONFIG = ModelConfig(vocab_size=64, dim=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     head_dim=16, ffn_dim=48)


@pytest.mark.parametrize(("context_lens", "query_lens"),
                         [([9, 1, 33], [1, 1, 1]), ([20, 20], [1, 1]), ([12], [12]),
                          ([9, 30, 33, 5], [1, 7, 1, 5])])
def test_attend_uses_kernel_and_equals_gather_path(context_lens: list[int],
                                                   query_lens: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode, prefill and mixed steps through `PagedAttention.attend`: one kernel call, and
    the output the gather + SDPA path (other devices, no compiler) gives.

    Unequal decode lengths give the gather path a mask; equal ones take its mask-free branch.
    """
    block_size = 8
    cache = KVCache(CONFIG, num_blocks=24, block_size=block_size, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    order = torch.randperm(cache.num_blocks, generator=gen).tolist()
    tables = []
    for length in context_lens:
        tables.append(order[:-(-length // block_size)])
        order = order[len(tables[-1]):]
    attention = build_paged_attention(cache, block_tables=tables, context_lens=context_lens,
                                      query_lens=query_lens)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, CONFIG.num_heads, CONFIG.head_dim, generator=gen)
    k, v = (torch.randn(num_tokens, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen)
            for _ in range(2))
    calls = []
    real = kernels.paged_attention

    def spy(*args: torch.Tensor, **kwargs: int) -> torch.Tensor | None:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_attention", spy)
    out = attention.attend(1, q, k, v)
    assert len(calls) == 1
    monkeypatch.setattr(kernels, "_kernel", lambda: None)  # as without a compiler
    assert real(*calls[0], block_size=block_size) is None
    expected = attention.attend(1, q, k, v)  # writes the same k, v again, then gathers
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# --- 16-bit and 8-bit caches -------------------------------------------------------------

def stored_as(problem: dict, kind: str) -> tuple[dict, dict]:
    """(the problem with its caches stored as `kind`, the same with those values in float32)."""
    if kind == "q8_0":
        (kq, kd), (vq, vd) = quantize_q8_0(problem["k_cache"]), quantize_q8_0(problem["v_cache"])
        stored = {"k_cache": kq, "v_cache": vq, "k_scales": kd, "v_scales": vd}
        widened = {"k_cache": dequantize_q8_0(kq, kd, torch.float32),
                   "v_cache": dequantize_q8_0(vq, vd, torch.float32)}
    else:
        dtype = getattr(torch, kind)
        stored = {name: problem[name].to(dtype) for name in ("k_cache", "v_cache")}
        widened = {name: stored[name].float() for name in stored}
    return {**problem, **stored}, {**problem, **widened}


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "q8_0"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(9, 3, 64), (8, 2, 128), (32, 8, 128)])
def test_narrow_caches_equal_their_float32_values(kind: str, num_heads: int, num_kv_heads: int,
                                                  head_dim: int) -> None:
    """A 16-bit or q8_0 pool gives exactly what a float32 pool holding the same values gives,
    for prefill rows and decode rows alike (widening is exact, the arithmetic unchanged)."""
    problem = random_prefill(num_heads, num_kv_heads, head_dim, 16, CHUNKS)
    stored, widened = stored_as(problem, kind)
    out = kernels.paged_attention(**stored, block_size=16)
    assert torch.equal(out, kernels.paged_attention(**widened, block_size=16))
    decode_stored, decode_widened = stored_as(as_decode_rows(problem), kind)
    assert torch.equal(kernels.paged_decode_attention(**decode_stored, block_size=16), out)
    assert torch.equal(kernels.paged_decode_attention(**decode_widened, block_size=16), out)
    # and the stored values are close to the originals (attention output, not bit-equal)
    tolerance = {"bfloat16": 2e-2, "float16": 2e-3, "q8_0": 4e-2}[kind]
    torch.testing.assert_close(out, prefill_reference(**problem, block_size=16), rtol=0,
                               atol=tolerance)


def test_q8_0_matches_gguf_quantizer() -> None:
    """quantize_q8_0 writes llama.cpp's q8_0 blocks: the same f16 scale and int8 values as
    gguf-py's reference quantizer (halves rounded away from zero)."""
    import gguf
    import numpy as np

    x = torch.randn(5, 3, 128, generator=torch.Generator().manual_seed(4)) * 3
    x[0, 0, :32] = 0.0  # an all-zero block: scale 0, values 0
    x[1, 1, :32] = torch.tensor([127.0, 2.5, -2.5, 0.5] + [0.0] * 28)  # d = 1: halves
    q, d = quantize_q8_0(x)
    blocks = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    blocks = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1, 34)
    assert torch.equal(d.reshape(-1), torch.from_numpy(blocks[:, :2].copy().view(np.float16))
                       .reshape(-1))
    assert torch.equal(q.reshape(-1, 32), torch.from_numpy(blocks[:, 2:].copy().view(np.int8)))


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "q8_0"])
def test_attend_with_each_kv_dtype_equals_gather_path(kind: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's pool in each storage: K/V written through `KVCache.write`, then a mixed
    prefill/decode step through the kernel equals the gather + SDPA path (other devices)."""
    block_size, context_lens, query_lens = 8, [9, 30, 33, 5], [1, 7, 1, 5]
    config = ModelConfig(vocab_size=64, dim=96, num_layers=2, num_heads=6, num_kv_heads=2,
                         head_dim=32, ffn_dim=48)  # q8_0 rows are whole blocks of 32
    cache = KVCache(config, num_blocks=24, block_size=block_size, dtype=kind)
    gen = torch.Generator().manual_seed(2)
    slots = torch.arange(cache.num_blocks * block_size)
    for layer in range(config.num_layers):
        k, v = (torch.randn(len(slots), config.num_kv_heads, config.head_dim, generator=gen)
                for _ in range(2))
        cache.write(layer, slots, k, v)
    tables = [list(range(i * 5, i * 5 + 5)) for i in range(4)]
    attention = build_paged_attention(cache, block_tables=tables, context_lens=context_lens,
                                      query_lens=query_lens)
    q = torch.randn(sum(query_lens), config.num_heads, config.head_dim, generator=gen)
    k, v = (torch.randn(sum(query_lens), config.num_kv_heads, config.head_dim, generator=gen)
            for _ in range(2))
    out = attention.attend(1, q, k, v)
    monkeypatch.setattr(kernels, "_kernel", lambda: None)  # as without a compiler
    torch.testing.assert_close(out, attention.attend(1, q, k, v), rtol=0, atol=1e-5)
    assert cache.keys[1].dtype == (torch.int8 if kind == "q8_0" else getattr(torch, kind))


PORTABLE_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_paged_attention import (CHUNKS, CONTEXT_LENS, as_decode_rows, prefill_reference,
                                  random_prefill, random_problem, reference)
ops = torch.ops.levante_quant
assert ops.isa() == "scalar", ops.isa()
for heads, kv_heads, head_dim in ((9, 3, 64), (32, 8, 128), (3, 1, 36)):
    p = random_problem(heads, kv_heads, head_dim, 16, CONTEXT_LENS)
    out = ops.paged_decode_attention(p["q"], p["k_cache"], p["v_cache"], p["block_tables"],
                                     p["context_lens"], 16, head_dim ** -0.5)
    torch.testing.assert_close(out, reference(**p, block_size=16), rtol=0, atol=1e-5)
    p = random_prefill(heads, kv_heads, head_dim, 16, CHUNKS)
    out = ops.paged_attention(p["q"], p["k_cache"], p["v_cache"], p["block_tables"],
                              p["context_lens"], p["query_lens"], 16, head_dim ** -0.5)
    torch.testing.assert_close(out, prefill_reference(**p, block_size=16), rtol=0, atol=1e-5)
    d = as_decode_rows(p)
    decoded = ops.paged_decode_attention(d["q"], d["k_cache"], d["v_cache"], d["block_tables"],
                                         d["context_lens"], 16, head_dim ** -0.5)
    assert torch.equal(out, decoded)
print("ok")
"""


@pytest.mark.slow
def test_portable_build_matches(run_portable_check: Callable[..., None]) -> None:
    """The no-AVX2 build (plain loops) computes the same, prefill rows equal to decode rows."""
    run_portable_check(PORTABLE_CHECK, str(Path(__file__).parent))
