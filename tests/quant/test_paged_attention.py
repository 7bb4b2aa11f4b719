"""The decode-step paged attention kernel against gathered keys and PyTorch's SDPA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from levante.config import ModelConfig
from levante.engine.kv_cache import KVCache, build_paged_attention
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
    assert torch.equal(parallel, serial)  # each (sequence, kv head) is one task either way


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
        ("float16 cache", {"k_cache": p["k_cache"].half()}, "float32"),
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


CONFIG = ModelConfig(vocab_size=64, dim=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     head_dim=16, ffn_dim=48)


@pytest.mark.parametrize("context_lens", [[9, 1, 33], [20, 20]])
def test_attend_uses_kernel_and_equals_gather_path(context_lens: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step through `PagedAttention.attend`: kernel or not, the same output.

    Unequal lengths give the gather path a mask; equal ones take its mask-free branch.
    """
    block_size = 8
    cache = KVCache(CONFIG, num_blocks=16, block_size=block_size, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    order = torch.randperm(cache.num_blocks, generator=gen).tolist()
    tables = []
    for length in context_lens:
        tables.append(order[:-(-length // block_size)])
        order = order[len(tables[-1]):]
    attention = build_paged_attention(cache, block_tables=tables, context_lens=context_lens,
                                      query_lens=[1] * len(context_lens))
    num_seqs = len(context_lens)
    q = torch.randn(num_seqs, CONFIG.num_heads, CONFIG.head_dim, generator=gen)
    k, v = (torch.randn(num_seqs, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen)
            for _ in range(2))
    calls = []
    real = kernels.paged_decode_attention

    def spy(*args: torch.Tensor, **kwargs: int) -> torch.Tensor | None:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_decode_attention", spy)
    out = attention.attend(1, q, k, v)
    assert len(calls) == 1
    monkeypatch.setattr(kernels, "_kernel", lambda: None)  # as without a compiler
    assert real(*calls[0], block_size=block_size) is None
    expected = attention.attend(1, q, k, v)  # writes the same k, v again, then gathers
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_prefill_step_does_not_use_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decode kernel ran on a prefill step")

    monkeypatch.setattr(kernels, "paged_decode_attention", fail)
    cache = KVCache(CONFIG, num_blocks=4, block_size=8, dtype=torch.float32)
    attention = build_paged_attention(cache, block_tables=[[2, 0]], context_lens=[12],
                                      query_lens=[12])
    out = attention.attend(0, torch.randn(12, 6, 16), torch.randn(12, 2, 16),
                           torch.randn(12, 2, 16))
    assert out.shape == (12, 6, 16)


PORTABLE_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_paged_attention import CONTEXT_LENS, random_problem, reference
ops = torch.ops.levante_quant
assert ops.isa() == "scalar", ops.isa()
for heads, kv_heads, head_dim in ((9, 3, 64), (32, 8, 128), (3, 1, 36)):
    p = random_problem(heads, kv_heads, head_dim, 16, CONTEXT_LENS)
    out = ops.paged_decode_attention(p["q"], p["k_cache"], p["v_cache"], p["block_tables"],
                                     p["context_lens"], 16, head_dim ** -0.5)
    torch.testing.assert_close(out, reference(**p, block_size=16), rtol=0, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_portable_build_matches(run_portable_check: Callable[..., None]) -> None:
    """The no-AVX2 build (plain loops) computes the same."""
    run_portable_check(PORTABLE_CHECK, str(Path(__file__).parent))
