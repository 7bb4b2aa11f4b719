"""GGUF block dequantizers: bit-for-bit equal to gguf-py's numpy reference (llama.cpp's)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from levante.quant.gguf_blocks import SUPPORTED_TYPES, dequantize, expected_nbytes
from levante.weights.gguf import GGUFFile

# Measured on the 2-core dev box (4096x4096, warm allocator): F16 1.3, BF16 1.2, Q8_0 1.1,
# Q4_0 1.0, Q4_1 0.9, Q4_K 0.8, Q5_K 0.5, Q6_K 0.7 billion values/s (2.4-7x gguf-py numpy).

QT = GGMLQuantizationType
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
# K-quants: gguf-py cannot quantize them; byte offsets of their f16 scale fields.
K_QUANT_F16_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82),
                      QT.Q3_K: (108,), QT.IQ4_XS: (0,)}


def assert_same_bits(got: torch.Tensor, reference: np.ndarray) -> None:
    """Equal float32 bit patterns (so -0.0 vs 0.0 would count as a difference)."""
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def random_floats(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values with row scales spanning 1e-3..1e3, plus an all-zero row and block."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.float32(10.0) ** rng.uniform(-3, 3, (*shape[:-1], 1)).astype(np.float32)
    x[..., 0, :] = 0.0
    x[..., 1, :32] = 0.0
    return x


def random_k_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType,
                    num_blocks: int) -> np.ndarray:
    """Random K-quant blocks with finite f16 scales of either sign: [num_blocks, type_size]."""
    blocks = rng.integers(0, 256, (num_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for start in K_QUANT_F16_FIELDS[qtype]:
        scales = rng.uniform(-2, 2, (num_blocks, 1)).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantizable_types_match_gguf_bit_for_bit(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    x = random_floats(rng, (3, 5, 256))
    packed = gguf.quants.quantize(x, qtype)
    data = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(-1))
    assert_same_bits(dequantize(data, qtype, (3, 5, 256)), gguf.quants.dequantize(packed, qtype))


@pytest.mark.parametrize("qtype", list(K_QUANT_F16_FIELDS), ids=lambda t: t.name)
def test_k_quants_match_gguf_bit_for_bit(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 24, 1024
    blocks = random_k_blocks(rng, qtype, rows * cols // 256).reshape(rows, -1)
    reference = gguf.quants.dequantize(blocks, qtype)
    assert_same_bits(dequantize(torch.from_numpy(blocks.reshape(-1)), qtype, (rows, cols)),
                     reference)


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight",
                                  "blk.29.ffn_down.weight", "output_norm.weight"])
def test_real_smollm2_tensors_match_gguf(smollm2_gguf: Path, name: str) -> None:
    f = GGUFFile(smollm2_gguf)
    qtype, shape = f.tensor_type(name), f.tensor_shape(name)
    raw = f.raw(name)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    reference = gguf.quants.dequantize(raw.numpy().reshape(byte_shape), qtype)
    assert_same_bits(dequantize(raw, qtype, shape), reference)


def test_smollm2_has_the_types_we_claim(smollm2_gguf: Path) -> None:
    f = GGUFFile(smollm2_gguf)
    assert {f.tensor_type(n) for n in f.tensor_names} == {QT.F32, QT.Q4_1, QT.Q8_0}


def test_float_result_is_a_new_tensor_even_from_an_odd_offset() -> None:
    values = torch.randn(64).half()
    data = torch.cat([torch.zeros(1, dtype=torch.uint8), values.view(torch.uint8)])[1:]
    assert data.storage_offset() == 1
    assert torch.equal(dequantize(data, QT.F16, (4, 16)), values.float().view(4, 16))
    f32 = torch.randn(8)
    out = dequantize(f32.view(torch.uint8), QT.F32, (8,))
    assert torch.equal(out, f32) and out.data_ptr() != f32.data_ptr()


def test_unsupported_type_is_named() -> None:
    data = torch.zeros(expected_nbytes(QT.IQ2_XS, (256,)), dtype=torch.uint8)
    with pytest.raises(ValueError, match="IQ2_XS is not supported"):
        dequantize(data, QT.IQ2_XS, (256,))
    assert QT.IQ2_XS not in SUPPORTED_TYPES


def test_byte_count_must_match_shape() -> None:
    data = torch.zeros(34 * 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"needs 136 bytes, got 102"):
        dequantize(data, QT.Q8_0, (4, 32))
    with pytest.raises(ValueError, match="blocks of 32 values"):
        dequantize(data, QT.Q8_0, (3, 33))
    with pytest.raises(ValueError, match="1-D uint8"):
        dequantize(data.view(3, 34), QT.Q8_0, (3, 32))
