"""The K-quant matmul kernel against gguf-py's dequantizer and a float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from levante.quant import kernels
from levante.quant.gguf_blocks import dequantize

QT = GGMLQuantizationType
# Every type the kernel's registry holds; a new type goes here too (see csrc/kquants/kquant.h).
TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# Byte offsets of each type's f16 fields (d, dmin): random bytes there could be inf / NaN.
F16_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q3_K: (108,),
              QT.Q2_K: (80, 82)}
NUM_ACTIVATION_ROWS = [1, 2, 3, 4, 5, 17, 64]  # decode (1-3), prefill tiles with remainders
# (K, N): N is no multiple of the 8-row panels; K = 1280 and 5120 are Mistral-like widths.
SHAPES = [(256, 13), (1280, 37), (5120, 9)]


def random_blocks(qtype: GGMLQuantizationType, num_rows: int, num_cols: int,
                  seed: int) -> torch.Tensor:
    """Random super-blocks with finite f16 scales of either sign: uint8 [N, row_bytes]."""
    rng = np.random.default_rng(seed)
    num_blocks = num_rows * num_cols // 256
    blocks = rng.integers(0, 256, (num_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for start in F16_FIELDS[qtype]:
        scales = rng.uniform(-0.02, 0.02, (num_blocks, 1)).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8)
    return torch.from_numpy(blocks.reshape(num_rows, -1))


def weight_of(blocks: torch.Tensor, qtype: GGMLQuantizationType, num_cols: int) -> torch.Tensor:
    """The float32 [N, K] weight (gguf_blocks, checked against gguf-py below)."""
    return dequantize(blocks.reshape(-1), qtype, (blocks.shape[0], num_cols))


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it, d * q, in float64 [M, K]."""
    q, d, _ = kernels.quantize_activations_k(x)
    return (q.double().view(x.shape[0], -1, 256) * d.double().unsqueeze(-1)).view(x.shape)


def check_against_references(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             label: str) -> None:
    """y = x @ W^T up to float32 sums (same rounded x) and up to x's 8-bit rounding."""
    w = weight.double()
    x_rounded = rounded_activations(x)
    terms = x_rounded.abs() @ w.abs().T  # sum of |products|: the float32 rounding scale
    error = (y.double() - x_rounded @ w.T).abs()
    assert (error <= 1e-5 * terms + 1e-30).all(), f"{label}: {(error / terms).max():.2e}"
    # Rounding x moves each value by at most amax / 254 of its block of 256.
    num_rows = x.shape[0]
    amax = x.abs().view(num_rows, -1, 256).amax(-1).double()  # [M, nb]
    w_block_l1 = w.abs().view(w.shape[0], -1, 256).sum(-1)  # [N, nb]
    bound = amax / 254 @ w_block_l1.T * (1 + 1e-5) + 1e-5 * (x.abs().double() @ w.abs().T)
    exact = x.double() @ w.T
    assert ((y.double() - exact).abs() <= bound).all(), label


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantization_equals_gguf(qtype: GGMLQuantizationType) -> None:
    """The float reference the kernel tests use is gguf-py's (llama.cpp's) bit for bit."""
    blocks = random_blocks(qtype, 6, 512, seed=0)
    expected = quants.dequantize(blocks.numpy(), qtype)  # [6, 512]
    got = weight_of(blocks, qtype, 512)
    assert torch.equal(got.view(torch.int32), torch.from_numpy(expected).view(torch.int32))


def test_registry_matches_library() -> None:
    assert kernels.available()
    assert kernels.kernel_kquant_types() == kernels.KQUANT_TYPES == frozenset(TYPES)


@pytest.mark.parametrize(("num_cols", "num_out"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kquant_linear_matches_references(qtype: GGMLQuantizationType, num_cols: int,
                                          num_out: int) -> None:
    blocks = random_blocks(qtype, num_out, num_cols, seed=num_cols)
    weight = weight_of(blocks, qtype, num_cols)
    gen = torch.Generator().manual_seed(num_out)
    for num_rows in NUM_ACTIVATION_ROWS:
        x = torch.randn(num_rows, num_cols, generator=gen)
        x[0, :256] *= 100  # one loud super-block: scales are per 256, not per row
        y = kernels.kquant_linear(x, blocks, qtype)
        assert y.shape == (num_rows, num_out) and y.dtype == torch.float32
        check_against_references(y, x, weight, f"M={num_rows}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prefill_blocking_and_odd_rows(qtype: GGMLQuantizationType) -> None:
    """M > 256 and long rows: several row blocks and super-block spans per panel; N < 8."""
    num_cols = 5120
    for num_out in (1, 7, 8, 9):
        blocks = random_blocks(qtype, num_out, num_cols, seed=num_out)
        x = torch.randn(300, num_cols, generator=torch.Generator().manual_seed(num_out))
        y = kernels.kquant_linear(x, blocks, qtype)
        check_against_references(y, x, weight_of(blocks, qtype, num_cols), f"N={num_out}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_batch(qtype: GGMLQuantizationType) -> None:
    """A row's output is bit-identical whatever rows share its call (issue 18).

    Decode (M <= 4) and prefill panels (M >= 5) must do the same float operations in the same
    order for each output; M = 300 on K = 5120 also splits each panel into several
    super-block spans, which must continue one sum, not add partial ones.
    """
    num_cols = 5120
    blocks = random_blocks(qtype, 21, num_cols, seed=7)
    x = torch.randn(300, num_cols, generator=torch.Generator().manual_seed(8))
    x[:, :256] *= 50  # super-blocks of very different scales: order of float sums matters
    alone = torch.cat([kernels.kquant_linear(x[i:i + 1], blocks, qtype) for i in range(17)])
    assert torch.equal(kernels.kquant_linear(x[:17], blocks, qtype), alone)
    assert torch.equal(kernels.kquant_linear(x[:5], blocks, qtype)[:3],
                       kernels.kquant_linear(x[:3], blocks, qtype))
    assert torch.equal(kernels.kquant_linear(x, blocks, qtype)[:17], alone)


def test_quantize_activations_k_rule() -> None:
    x = torch.randn(4, 768, generator=torch.Generator().manual_seed(0)) * 3
    x[1, 256:512] = 0  # a block of zeros: d = 0, q = 0
    x[2, :256] = (torch.arange(256) - 127.5) / 127  # halves after scaling: ties round to even
    q, d, bsum = kernels.quantize_activations_k(x)
    blocks = x.view(4, 3, 256)
    amax = blocks.abs().amax(-1)  # [4, 3]
    inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    expected = torch.round(blocks * inverse.unsqueeze(-1)).to(torch.int8).view(4, 768)
    assert torch.equal(q, expected)
    assert torch.equal(d, amax / 127.0)
    assert torch.equal(bsum, q.view(4, -1, 16).sum(-1, dtype=torch.int16))
    assert bsum.dtype == torch.int16 and q.abs().max() <= 127


def test_keeps_leading_dims_and_dtype() -> None:
    blocks = random_blocks(QT.Q4_K, 11, 512, seed=2)
    x = torch.randn(2, 3, 512)
    y = kernels.kquant_linear(x.bfloat16(), blocks, QT.Q4_K)
    assert y.shape == (2, 3, 11) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, kernels.kquant_linear(x.bfloat16().float(), blocks,
                                                        QT.Q4_K).bfloat16())
    flat = kernels.kquant_linear(x.view(6, 512), blocks, QT.Q4_K)
    torch.testing.assert_close(kernels.kquant_linear(x, blocks, QT.Q4_K), flat.view(2, 3, 11))


def test_pytorch_fallback_equals_dequantized_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = random_blocks(QT.Q4_K, 5, 512, seed=3)
    x = torch.randn(2, 512)
    monkeypatch.setattr(kernels, "_kernel", lambda: None)  # as without a compiler
    y = kernels.kquant_linear(x, blocks, QT.Q4_K)
    torch.testing.assert_close(y, x @ weight_of(blocks, QT.Q4_K, 512).T)


def test_op_schema_and_fake_kernel() -> None:
    """The op traces (torch.compile needs the fake kernel and a correct schema)."""
    assert kernels.available()
    blocks = random_blocks(QT.Q4_K, 9, 512, seed=4)
    torch.library.opcheck(torch.ops.levante_quant.kquant_linear.default,
                          (torch.randn(5, 512), blocks, int(QT.Q4_K)),
                          test_utils=("test_schema", "test_faketensor"))


def test_rejects_bad_input() -> None:
    assert kernels.available()
    blocks = random_blocks(QT.Q4_K, 4, 512, seed=5)
    op = torch.ops.levante_quant.kquant_linear.default
    x = torch.randn(2, 512)
    with pytest.raises(RuntimeError, match="super-blocks of 256"):
        op(torch.randn(2, 500), blocks, int(QT.Q4_K))
    with pytest.raises(RuntimeError, match=r"uint8 \[N, 288\]"):
        op(x, blocks[:, :-1].contiguous(), int(QT.Q4_K))  # a byte short per row
    with pytest.raises(RuntimeError, match=r"uint8 \[N, 288\]"):
        op(x, blocks.view(torch.int8), int(QT.Q4_K))
    with pytest.raises(RuntimeError, match=r"uint8 \[N, 288\]"):
        op(x, blocks.t(), int(QT.Q4_K))  # not contiguous (and the wrong shape)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), blocks, int(QT.Q4_K))
    with pytest.raises(RuntimeError, match="not a K-quant type"):
        op(x, blocks, int(QT.Q8_0))
    with pytest.raises(ValueError, match="Q8_0"):
        kernels.kquant_linear(x, blocks, QT.Q8_0)
    with pytest.raises(RuntimeError, match="super-blocks of 256"):
        kernels.quantize_activations_k(torch.randn(2, 300))


PORTABLE_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
ops = torch.ops.levante_quant
assert ops.isa() == sys.argv[3], ops.isa()
blocks, x, quantized, expected, terms = torch.load(sys.argv[2])
for got, want in zip(ops.quantize_rows_k(x), quantized):
    assert torch.equal(got, want)
for qtype, w in blocks.items():
    for num_rows in (2, 7):  # decode and prefill paths in the AVX2 build
        error = (ops.kquant_linear(x[:num_rows], w, qtype) - expected[qtype][:num_rows]).abs()
        assert (error <= 2e-5 * terms[qtype][:num_rows]).all(), (qtype, num_rows)
print("ok")
"""


def _check_inputs(path: Path) -> None:
    """Blocks of every K-quant type, activations, and this build's results, saved to `path`."""
    x = torch.randn(7, 1280, generator=torch.Generator().manual_seed(6))
    blocks = {int(t): random_blocks(t, 19, 1280, seed=int(t)) for t in TYPES}
    expected = {t: torch.cat([kernels.kquant_linear(x[:2], w, QT(t)),
                              kernels.kquant_linear(x[2:], w, QT(t))]) for t, w in blocks.items()}
    terms = {t: (rounded_activations(x).abs() @ weight_of(w, QT(t), 1280).double().abs().T).float()
             for t, w in blocks.items()}  # float32 sums round relative to these
    torch.save((blocks, x, kernels.quantize_activations_k(x), expected, terms), path)


@pytest.mark.slow
def test_portable_build_matches(run_portable_check: Callable[..., None],
                                tmp_path: Path) -> None:
    """The no-AVX2 build (plain loops) quantizes the same and computes the same sums."""
    _check_inputs(tmp_path / "inputs.pt")
    run_portable_check(PORTABLE_CHECK, str(tmp_path / "inputs.pt"), "scalar")


@pytest.mark.slow
def test_clang_build_matches(run_clang_check: Callable[..., None], tmp_path: Path) -> None:
    """clang (what a Mac compiles with) builds the same SIMD kernels, with the same results."""
    _check_inputs(tmp_path / "inputs.pt")
    run_clang_check(PORTABLE_CHECK, str(tmp_path / "inputs.pt"), kernels.kernel_isa())


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "isa"), [("x86-64-v3", "avx2"), ("alderlake", "avx2+vnni")])
def test_avx2_builds_match(run_arch_check: Callable[..., None], tmp_path: Path, arch: str,
                           isa: str) -> None:
    """The 256-bit kernels (8-row panels; maddubs without VNNI) compute the same sums."""
    _check_inputs(tmp_path / "inputs.pt")
    run_arch_check(arch, PORTABLE_CHECK, str(tmp_path / "inputs.pt"), isa)
