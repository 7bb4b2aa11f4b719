"""The quantized matmul kernel against gguf-py's dequantizer and an exact integer reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, quants

from levante.quant import kernels
from levante.quant.kernels import PackedWeight

Q4_0, Q4_1, Q8_0 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                    GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def real_weights(smollm2_gguf: Path) -> dict[GGMLQuantizationType, np.ndarray]:
    """Raw block bytes [N, row_bytes] per format, from the SmolLM2 file via gguf-py's reader.

    Q4_1 and Q8_0 are the file's own tensors; the file has no Q4_0, so gguf-py quantizes one.
    """
    tensors = {t.name: t for t in GGUFReader(smollm2_gguf).tensors}
    down, embed, gate = (tensors[n] for n in ("blk.0.ffn_down.weight", "token_embd.weight",
                                              "blk.0.ffn_gate.weight"))
    assert (down.tensor_type, embed.tensor_type) == (Q4_1, Q8_0)
    gate_float = quants.dequantize(gate.data[:512], gate.tensor_type)
    return {Q4_1: np.array(down.data), Q8_0: np.array(embed.data[:1024]),
            Q4_0: quants.quantize(gate_float, Q4_0)}


def pack(qtype: GGMLQuantizationType, raw: np.ndarray) -> PackedWeight:
    num_rows = raw.shape[0]
    num_cols = quants.quant_shape_from_byte_shape(raw.shape, qtype)[1]
    return kernels.repack(qtype, torch.from_numpy(raw), (num_rows, num_cols))


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's Q8 activation rule in torch: per 32 values d = amax/127, q = round(x*127/amax)."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)  # [M, nb]
    inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse.unsqueeze(-1))
    d = amax / 127.0
    return q.to(torch.int8).view_as(x), d, d * q.sum(-1)


def reference_from_quantized(x: torch.Tensor, raw: np.ndarray,
                             qtype: GGMLQuantizationType) -> torch.Tensor:
    """sum_b d_w * d_x * (integer block dot) + min term, in float64, from the file's bytes."""
    xq, dx, sx = (t.double() for t in reference_quantize(x))
    num_rows = raw.shape[0]
    blocks = torch.from_numpy(raw).view(num_rows, -1, GGML_QUANT_SIZES[qtype][1])
    w_d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).double()  # [N, nb]
    if qtype == Q8_0:
        wq = blocks[..., 2:].contiguous().view(torch.int8).double()  # [N, nb, 32]
    else:
        packed = blocks[..., 4:] if qtype == Q4_1 else blocks[..., 2:]  # byte j: j, j + 16
        wq = torch.cat([packed & 0x0F, packed >> 4], dim=-1).double()
    integer = torch.einsum("mbj,nbj->mnb", xq.view(x.shape[0], -1, 32), wq)  # exact
    y = (integer * torch.einsum("mb,nb->mnb", dx, w_d)).sum(-1)
    if qtype == Q4_1:
        y += sx @ blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).double().T
    elif qtype == Q4_0:
        y += sx @ (-8.0 * w_d).T
    return y


@pytest.mark.parametrize("num_rows", [1, 3, 17, 64])
@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_qlinear_matches_dequantized_matmul(real_weights: dict, qtype: GGMLQuantizationType,
                                            num_rows: int) -> None:
    raw = real_weights[qtype]
    weight = torch.from_numpy(quants.dequantize(raw, qtype)).double()  # [N, K]
    x = torch.randn(num_rows, weight.shape[1], generator=torch.Generator().manual_seed(num_rows))
    y = kernels.qlinear(x, pack(qtype, raw))
    exact = x.double() @ weight.T
    # Rounding x to 8 bits moves each value by at most d_x / 2 = amax_b / 254, so output n
    # moves by at most sum_b amax_b / 254 * ||W[n, block b]||_1; float32 sums add ~1e-6.
    amax = x.abs().view(num_rows, -1, 32).amax(-1).double()  # [M, nb]
    w_block_l1 = weight.abs().view(weight.shape[0], -1, 32).sum(-1)  # [N, nb]
    bound = amax / 254 @ w_block_l1.T + 1e-5 * (x.abs().double() @ weight.abs().T)
    assert y.shape == (num_rows, weight.shape[0]) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all()
    # Typical size: uniform rounding error of std d_x / sqrt(12), d_x ~ 2.3 / 127 for 32
    # Gaussian values, is ~0.5% of x's std; allow 4x for rows of correlated weights.
    relative = (y.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.median() < 1e-2 and relative.max() < 2e-2, relative.max()
    # Against the same activation quantization done in torch, only float rounding is left.
    same_rule = reference_from_quantized(x, raw, qtype)
    slack = 1e-5 * (x.abs().double() @ weight.abs().T)
    assert ((y.double() - same_rule).abs() <= slack).all()


def test_quantize_activations_equal_torch_rule() -> None:
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0)) * 3
    x[1, 32:64] = 0  # a block of zeros: d = 0, q = 0
    x[2, :32] = torch.arange(32) - 15.5  # halves: ties round to even
    q, d, s = kernels.quantize_activations(x)
    ref_q, ref_d, ref_s = reference_quantize(x)
    assert torch.equal(q, ref_q) and torch.equal(d, ref_d) and torch.equal(s, ref_s)


@pytest.mark.parametrize("num_cols", [96, 576, 608])  # 3, 18, 19 blocks: odd and short rows
@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_integer_dot_products_are_exact(qtype: GGMLQuantizationType, num_cols: int) -> None:
    """Powers-of-two scales and integer x with amax 127: every float step is exact."""
    gen = torch.Generator().manual_seed(1)
    num_rows, num_inputs = 9, 6
    nb = num_cols // 32
    if qtype == Q8_0:  # the full int8 range, -128 included
        qs = torch.randint(0, 256, (num_rows, num_cols), dtype=torch.uint8, generator=gen)
    else:
        qs = torch.randint(0, 256, (num_rows, nb * 16), dtype=torch.uint8, generator=gen)
    d = (2.0 ** torch.randint(-2, 3, (num_rows, nb), generator=gen)).half()
    m = torch.randint(-4, 5, (num_rows, nb), generator=gen).half() if qtype == Q4_1 else None
    w = PackedWeight(qtype, (num_rows, num_cols), qs, d, m)
    x = torch.randint(-127, 128, (num_inputs, nb, 32), generator=gen).float()
    x[:, :, 0] = 127.0  # amax 127 in every block: d_x = 1, q = x
    x = x.view(num_inputs, num_cols)
    y = kernels.qlinear(x, w)
    expected = x.double() @ kernels.dequantize_packed(w).double().T
    assert torch.equal(y.double(), expected)


@pytest.mark.parametrize("num_out", [1, 5, 7, 13])
def test_odd_output_sizes(real_weights: dict, num_out: int) -> None:
    raw = real_weights[Q4_1][:num_out]
    weight = torch.from_numpy(quants.dequantize(raw, Q4_1)).double()
    for num_rows in (1, 3, 17):
        x = torch.randn(num_rows, weight.shape[1], generator=torch.Generator().manual_seed(3))
        y = kernels.qlinear(x, pack(Q4_1, raw))
        slack = 1e-5 * (x.abs().double() @ weight.abs().T)
        assert ((y.double() - reference_from_quantized(x, raw, Q4_1)).abs() <= slack).all()


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_repack_is_lossless(real_weights: dict, qtype: GGMLQuantizationType) -> None:
    raw = real_weights[qtype]
    w = pack(qtype, raw)
    assert torch.equal(w.to_raw(), torch.from_numpy(raw).reshape(-1))
    assert w.nbytes == raw.nbytes
    assert torch.equal(kernels.dequantize_packed(w),
                       torch.from_numpy(quants.dequantize(raw, qtype)))


def test_repack_layout_worked_example() -> None:
    """The PackedWeight docstring's example, byte for byte."""
    block0 = bytes([0x00, 0x3C, 0x00, 0xBC, 0x21, 0x43] + [0] * 14)  # d 1.0, m -1.0
    block1 = bytes([0x00, 0x38, 0x00, 0x00, 0x65, 0x87] + [0] * 14)  # d 0.5, m 0.0
    raw = torch.frombuffer(bytearray(block0 + block1), dtype=torch.uint8)
    w = kernels.repack(Q4_1, raw, (1, 64))
    assert w.d.tolist() == [[1.0, 0.5]] and w.m is not None and w.m.tolist() == [[-1.0, 0.0]]
    assert w.qs.shape == (1, 32)
    assert w.qs[0, [0, 1, 16, 17]].tolist() == [0x21, 0x43, 0x65, 0x87]  # alone: file order
    weight = kernels.dequantize_packed(w)[0]
    assert weight[[0, 16, 32, 48]].tolist() == [0.0, 1.0, 2.5, 3.0]
    # Ten rows, quant byte j of row i equal to 16 i + j in both blocks: rows 0..7 form a
    # panel, ordered block, step (4 bytes), row; rows 8 and 9 the last panel, likewise.
    raw = torch.cat([torch.cat([torch.tensor([0, 0x3C, 0, 0], dtype=torch.uint8),
                                torch.arange(16 * i, 16 * i + 16, dtype=torch.uint8)]).repeat(2)
                     for i in range(10)])
    w = kernels.repack(Q4_1, raw, (10, 64))
    expected = [[16 * row + 4 * step + k for _ in range(2) for step in range(4) for row in rows
                 for k in range(4)] for rows in (range(8), range(8, 10))]
    assert w.qs[:8].reshape(-1).tolist() == expected[0]
    assert w.qs[8:].reshape(-1).tolist() == expected[1]
    assert torch.equal(w.to_raw(), raw)


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_compiled_repack_equals_the_pytorch_path(real_weights: dict, qtype: GGMLQuantizationType,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/repack.cpp moves the same bytes as the PyTorch copies, whole or chunk by chunk
    (a short last panel included: 509 rows = 63 panels of 8 + 5)."""
    assert kernels.available()
    raw = torch.from_numpy(real_weights[qtype][:509].copy())
    num_cols = quants.quant_shape_from_byte_shape(tuple(raw.shape), qtype)[1]
    compiled = kernels.repack(qtype, raw, (509, num_cols))
    chunked = kernels.empty_packed(qtype, (509, num_cols))
    for start in range(0, 509, 64):
        kernels.repack_into(chunked, start, raw[start:start + 64])
    with pytest.raises(ValueError, match="whole 8-row panels"):
        kernels.repack_into(chunked, 4, raw[4:12])
    monkeypatch.setattr(kernels, "_kernel", lambda: None)
    reference = kernels.repack(qtype, raw, (509, num_cols))
    for w in (compiled, chunked):
        assert torch.equal(w.qs, reference.qs) and torch.equal(w.d.view(torch.int16),
                                                                reference.d.view(torch.int16))
        assert (w.m is None) == (reference.m is None)
        if w.m is not None and reference.m is not None:
            assert torch.equal(w.m.view(torch.int16), reference.m.view(torch.int16))
    assert torch.equal(reference.to_raw(), raw.reshape(-1))


def test_pytorch_fallback_equals_dequantized_matmul(real_weights: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    raw = real_weights[Q4_1]
    weight = torch.from_numpy(quants.dequantize(raw, Q4_1))
    x = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(4))
    expected = x @ weight.T
    monkeypatch.setattr(kernels, "_kernel", lambda: None)  # as without a compiler
    y = kernels.qlinear(x, pack(Q4_1, raw))
    assert y.shape == (2, 3, weight.shape[0])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_keeps_leading_dims_and_dtype(real_weights: dict) -> None:
    w = pack(Q4_1, real_weights[Q4_1])
    x = torch.randn(2, 3, w.shape[1]).bfloat16()
    y = kernels.qlinear(x, w)
    assert y.shape == (2, 3, w.shape[0]) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, kernels.qlinear(x.float(), w).bfloat16())


def test_op_schema_and_fake_kernel(real_weights: dict) -> None:
    """The op traces (torch.compile needs the fake kernel and a correct schema)."""
    w = pack(Q4_1, real_weights[Q4_1])
    assert kernels.available()
    torch.library.opcheck(torch.ops.levante_quant.qlinear.default,
                          (torch.randn(3, w.shape[1]), w.qs, w.d, w.m, int(w.qtype)),
                          test_utils=("test_schema", "test_faketensor"))


def test_rejects_bad_input(real_weights: dict) -> None:
    raw = torch.from_numpy(real_weights[Q4_1])
    with pytest.raises(ValueError, match="Q4_K"):
        kernels.repack(GGMLQuantizationType.Q4_K, raw, (576, 1536))
    with pytest.raises(ValueError, match="needs"):
        kernels.repack(Q4_1, raw[:-1], (576, 1536))
    with pytest.raises(ValueError, match="blocks of 32"):
        kernels.repack(Q4_1, raw, (576, 1530))
    with pytest.raises(ValueError, match="features"):
        kernels.qlinear(torch.randn(1, 576), kernels.repack(Q4_1, raw, (576, 1536)))


PORTABLE_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from gguf import GGMLQuantizationType
from levante.quant import kernels
ops = torch.ops.levante_quant
assert ops.isa() == sys.argv[2], ops.isa()
gen = torch.Generator().manual_seed(0)
for qtype, quant_bytes in ((GGMLQuantizationType.Q8_0, 32), (GGMLQuantizationType.Q4_1, 16),
                           (GGMLQuantizationType.Q4_0, 16)):
    num_rows, num_blocks = 13, 19
    qs = torch.randint(0, 256, (num_rows, num_blocks * quant_bytes), dtype=torch.uint8,
                       generator=gen)
    d = (torch.rand(num_rows, num_blocks, generator=gen) / 8).half()
    m = -d * 8 if qtype == GGMLQuantizationType.Q4_1 else None
    w = kernels.PackedWeight(qtype, (num_rows, num_blocks * 32), qs, d, m)
    x = torch.randn(11, num_blocks * 32, generator=gen)
    q, dx, _ = ops.quantize_rows(x)
    x_rounded = q.double().view(11, num_blocks, 32) * dx.double().unsqueeze(-1)
    expected = x_rounded.view(11, -1) @ kernels.dequantize_packed(w).double().T
    y = ops.qlinear(x, w.qs, w.d, w.m, int(qtype))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(ops.qlinear(x[3:4], w.qs, w.d, w.m, int(qtype)), y[3:4])
print("ok")
"""


@pytest.mark.slow
def test_portable_build_matches(run_portable_check: Callable[..., None]) -> None:
    """The no-AVX2 build (what a CPU without AVX2 compiles) computes the same."""
    run_portable_check(PORTABLE_CHECK, "scalar")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "isa"), [("x86-64-v3", "avx2"), ("alderlake", "avx2+vnni")])
def test_avx2_builds_match(run_arch_check: Callable[..., None], arch: str, isa: str) -> None:
    """The 256-bit builds (maddubs without VNNI; AVX-VNNI) compute the same."""
    run_arch_check(arch, PORTABLE_CHECK, isa)


@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=lambda t: t.name)
def test_rows_are_batch_invariant(qtype: GGMLQuantizationType) -> None:
    """A row's output is the same bits alone, in a small batch, and in a prefill of 300 rows
    (past the 256-row blocks and, at K = 2048, the spans of blocks the kernel splits K into)."""
    gen = torch.Generator().manual_seed(5)
    num_rows, num_cols = 13, 2048  # a full panel and a short one
    raw = torch.randint(0, 256, (num_rows, num_cols // 32, GGML_QUANT_SIZES[qtype][1]),
                        dtype=torch.uint8, generator=gen)
    raw[..., :2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)  # scales 2^-10
    if qtype == Q4_1:
        raw[..., 2:4] = torch.tensor([0x00, 0x94], dtype=torch.uint8)  # mins -2^-10
    w = kernels.repack(qtype, raw.view(-1), (num_rows, num_cols))
    x = torch.randn(300, num_cols, generator=gen)
    whole = kernels.qlinear(x, w)
    for start, size in ((0, 1), (7, 1), (299, 1), (3, 2), (10, 5), (100, 13), (260, 40)):
        assert torch.equal(kernels.qlinear(x[start:start + size], w), whole[start:start + size])
