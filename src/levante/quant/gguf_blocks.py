"""GGUF block formats: layout constants and torch dequantizers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

# Bytes of the 6-bit scale/min table in a Q4_K / Q5_K super-block (8 scales + 8 mins).
K_SCALE_SIZE = 12

# The float operations below follow gguf-py's `quants.py` (llama.cpp's numpy reference) in
# order and precision, so results are bit-for-bit equal: scales are f16 widened to f32 and
# Q4_K is `(d * sc) * q - (dmin * m)` in float32. (With f16 scales and small integer codes the
# products are exact; only the final add or subtract rounds.)
# We hand-write these instead of calling gguf-py because its numpy version runs at
# 80-520 MB/s and allocates per group of rows; these are single vectorized torch passes.


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start + 2) of every block as a little-endian f16, widened: [n_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _low_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k] uint8: low nibbles first, then high nibbles."""
    nibbles = torch.empty(*packed.shape[:-1], 2, packed.shape[-1], dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=nibbles.select(-2, 0))
    torch.bitwise_right_shift(packed, 4, out=nibbles.select(-2, 1))
    return nibbles


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte table of eight 6-bit scales and eight 6-bit mins: 2 x [n_blocks, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 keep
    their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in
    the top 2 bits of bytes 0-3 (scales) / 4-7 (mins).
    Example: byte 0 = 0x45 (0b01_000101), byte 8 = 0x23 -> scale 0 = 5,
    scale 4 = 0x3 | (0b01 << 4) = 19, min 4 = 0x2 | (top 2 bits of byte 4) << 4.
    """
    table = scales.reshape(-1, 3, 4)
    low, mid, high = table[:, 0], table[:, 1], table[:, 2]
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc, mins


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34-byte blocks of 32 values: f16 scale d, then 32 int8 q; x = q * d.

    Example: bytes 00 3C | 05 FB ... -> d = 0x3C00 = 1.0, q = [5, -5, ...] -> [5.0, -5.0, ...].
    """
    d = _f16_field(blocks, 0)  # [n, 1]
    return blocks[:, 2:].view(torch.int8).float().mul_(d)  # [n, 32]


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18-byte blocks of 32 values: f16 scale d, 16 bytes of 4-bit q; x = (q - 8) * d.

    Byte i holds value i in its low nibble and value i + 16 in its high nibble.
    Example: bytes 00 40 | 9A ... -> d = 2.0; x0 = (0xA - 8) * 2 = 4.0, x16 = (0x9 - 8) * 2 = 2.0.
    """
    d = _f16_field(blocks, 0)
    q = _low_high_nibbles(blocks[:, 2:]).view(-1, 32)
    q.sub_(8)  # wraps in uint8; read back as int8 gives -8..7
    return q.view(torch.int8).float().mul_(d)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20-byte blocks of 32 values: f16 scale d, f16 min m, 16 bytes of 4-bit q; x = d*q + m.

    Nibble order as Q4_0. Example: bytes 00 3C | 00 BC | 9A ... -> d = 1.0, m = -1.0;
    x0 = 1.0 * 0xA - 1.0 = 9.0, x16 = 1.0 * 0x9 - 1.0 = 8.0.
    """
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
    q = _low_high_nibbles(blocks[:, 4:]).view(-1, 32)
    return q.float().mul_(d).add_(m)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes = one little-endian u32 per block -> [n, 32] uint8: bit i of it as 0 or 16."""
    bits = torch.arange(8, dtype=torch.uint8).view(1, 1, 8)
    return (qh.unsqueeze(-1) >> bits).bitwise_and_(1).bitwise_left_shift_(4).view(-1, 32)


def _dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22-byte blocks of 32 values: f16 d, u32 qh (bit 4 of value i is bit i), 16 bytes of
    low nibbles ordered as Q4_0; x = (q - 16) * d.

    Example: d = 1.0, qh bit 0 set, byte 0 of qs = 0x3 -> x0 = (0x3 | 0x10) - 16 = 3.0.
    llama.cpp writes Q5_0 for tensors whose rows do not fit 256-value super-blocks.
    """
    d = _f16_field(blocks, 0)
    q = _low_high_nibbles(blocks[:, 6:]).view(-1, 32).bitwise_or_(_fifth_bits(blocks[:, 2:6]))
    q.sub_(16)  # wraps in uint8; read back as int8 gives -16..15
    return q.view(torch.int8).float().mul_(d)


def _dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24-byte blocks of 32 values: f16 d, f16 min m, u32 qh, 16 bytes of low nibbles;
    x = d * q + m with q = 0..31 (fifth bit from qh as in Q5_0).

    Example: d = 0.5, m = -1.0, qh bit 16 set, qs[0] = 0x20 -> x16 = 0.5 * 18 - 1.0 = 8.0.
    """
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
    q = _low_high_nibbles(blocks[:, 8:]).view(-1, 32).bitwise_or_(_fifth_bits(blocks[:, 4:8]))
    return q.float().mul_(d).add_(m)


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144-byte super-blocks of 256 values = 8 sub-blocks of 32.

    Layout: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins (see `_k_scales_mins`), 128 bytes
    of 4-bit q in 4 chunks of 32 bytes: chunk c's low nibbles are sub-block 2c, its high
    nibbles sub-block 2c + 1. x = (d * scale_j) * q - (dmin * min_j).
    Example: d = 0.5, dmin = 0.25, scale_1 = 3, min_1 = 4, qs[0] = 0x7B -> sub-block 0 value 0
    is q = 0xB (with scale_0/min_0), sub-block 1 value 0 is 1.5 * 7 - 1.0 = 9.5.
    """
    num_blocks = blocks.shape[0]
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mins = _k_scales_mins(blocks[:, 4:4 + K_SCALE_SIZE])
    scale = (d * sc.float()).unsqueeze(-1)  # [n, 8, 1]
    offset = (dmin * mins.float()).unsqueeze(-1)
    q = _low_high_nibbles(blocks[:, 16:].reshape(num_blocks, 4, 32)).view(num_blocks, 8, 32)
    return q.float().mul_(scale).sub_(offset).view(num_blocks, QK_K)


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K, 176-byte super-blocks of 256 values: Q4_K plus a fifth bit per value.

    Layout: f16 d, f16 dmin, 12 scale bytes, 32 bytes qh, 128 bytes low nibbles (as Q4_K).
    Bit j of qh[l] is bit 4 of value l of sub-block j. x = (d * scale_j) * q - (dmin * min_j).
    Example: qh[0] = 0b0000_0010, qs[0] = 0x7B -> value 0 of sub-block 0 is 0xB,
    value 0 of sub-block 1 is 0x7 | 0x10 = 23.
    """
    num_blocks = blocks.shape[0]
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mins = _k_scales_mins(blocks[:, 4:4 + K_SCALE_SIZE])
    scale = (d * sc.float()).unsqueeze(-1)  # [n, 8, 1]
    offset = (dmin * mins.float()).unsqueeze(-1)
    q = _low_high_nibbles(blocks[:, 48:].reshape(num_blocks, 4, 32)).view(num_blocks, 8, 32)
    bit_index = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    fifth = (blocks[:, 16:48].unsqueeze(1) >> bit_index).bitwise_and_(1).bitwise_left_shift_(4)
    q.bitwise_or_(fifth)  # [n, 8, 32] values 0..31
    return q.float().mul_(scale).sub_(offset).view(num_blocks, QK_K)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210-byte super-blocks of 256 values = 16 sub-blocks of 16, int8 scale each.

    Layout: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales, f16 d.
    Value e = 128h + 32t + l (half h in 0..1, t in 0..3, l in 0..31) takes its low bits from
    ql[64h + 32(t % 2) + l] (low nibble if t < 2, else high) and its high bits from bits
    2t..2t+1 of qh[32h + l]; x = (d * scales[e // 16]) * (q - 32).
    Example: ql[0] = 0x5A, qh[0] = 0b00_00_01_10, scales[0] = 2, d = 1.0 -> value 0 is
    (0xA | 0b10 << 4) - 32 = 10 -> 20.0; value 32 has high bits 0b01: (ql[32] & 0xF) + 16 - 32.
    """
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, 208)
    scale = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # [n, 16, 1]
    low_shift = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    high_shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    low = (blocks[:, :128].reshape(num_blocks, 2, 1, 64) >> low_shift).bitwise_and_(0x0F)
    high = (blocks[:, 128:192].reshape(num_blocks, 2, 1, 32) >> high_shift).bitwise_and_(0x03)
    q = low.view(num_blocks, 8, 32).bitwise_or_(high.view(num_blocks, 8, 32).bitwise_left_shift_(4))
    q.sub_(32)  # wraps in uint8; read back as int8 gives -32..31
    return q.view(torch.int8).view(num_blocks, 16, 16).float().mul_(scale).view(num_blocks, QK_K)


def _dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K, 84-byte super-blocks of 256 values = 16 sub-blocks of 16.

    Layout: 16 bytes of 4-bit scale (low nibble) and 4-bit min (high nibble) per sub-block,
    64 bytes of 2-bit q, f16 d, f16 dmin. Value e = 128h + 32s + l (half h in 0..1, shift s in
    0..3, l in 0..31) is bits 2s..2s+1 of qs[32h + l]; x = (d * sc) * q - (dmin * m) with the
    scale/min of sub-block e // 16.
    Example: scales[0] = 0x21, d = 1.0, dmin = 0.5, qs[0] = 0b11_10_01_00 -> value 0 is
    1 * 0 - 1.0 = -1.0; value 32 (shift 1, sub-block 2) has q = 1.
    """
    num_blocks = blocks.shape[0]
    d, dmin = _f16_field(blocks, 80), _f16_field(blocks, 82)
    scales = blocks[:, :16]
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)  # [n, 16, 1]
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = (blocks[:, 16:80].reshape(num_blocks, 2, 1, 32) >> shift).bitwise_and_(3)
    return q.view(num_blocks, 16, 16).float().mul_(dl).sub_(ml).view(num_blocks, QK_K)


def _dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K, 110-byte super-blocks of 256 values = 16 sub-blocks of 16, 6-bit signed scales.

    Layout: 32 bytes hmask, 64 bytes of 2-bit low bits, 12 bytes of scales, f16 d.
    Value e = 128h + 32s + l takes its low 2 bits from bits 2s..2s+1 of qs[32h + l] and its
    high bit from bit e // 32 of hmask[l]; q = low - 4 when that bit is 0, else low (-4..3).
    Scale j (0..15) is the low (j < 8) or high (j >= 8) nibble of byte j % 8, plus bits
    2(j // 4)..+1 of byte 8 + j % 4 as bits 4-5, minus 32; x = (d * scale_{e // 16}) * q.
    Example: scale byte 0 = 0x21, byte 8 = 0b10 -> scale 0 = (0x1 | 0b10 << 4) - 32 = 1.
    """
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, 108)
    table = blocks[:, 96:108]
    low_shift = torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1)
    high_shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)
    low = (table[:, :8].reshape(num_blocks, 1, 8) >> low_shift).reshape(num_blocks, 16) & 0x0F
    high = (table[:, 8:].reshape(num_blocks, 1, 4) >> high_shift).reshape(num_blocks, 16) & 0x03
    scales = (low | (high << 4)).view(torch.int8) - 32
    dl = (d * scales.float()).unsqueeze(-1)  # [n, 16, 1]
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q_low = (blocks[:, 32:96].reshape(num_blocks, 2, 1, 32) >> shift).bitwise_and_(3)
    bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    q_high = (blocks[:, :32].reshape(num_blocks, 1, 32) >> bits).bitwise_and_(1)  # [n, 8, 32]
    q = q_low.view(num_blocks, 8, 32).view(torch.int8) - ((1 - q_high.view(torch.int8)) << 2)
    return q.view(num_blocks, 16, 16).float().mul_(dl).view(num_blocks, QK_K)


# IQ4_NL / IQ4_XS code book: a 4-bit code indexes these int8 values.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS, 136-byte super-blocks of 256 values = 8 sub-blocks of 32, non-linear codes.

    Layout: f16 d, u16 scales_h (2 high bits per sub-block), 4 bytes scales_l (4 low bits per
    sub-block, low nibble first), 128 bytes of 4-bit codes (16 bytes per sub-block: byte i holds
    value i in its low nibble and value i + 16 in its high nibble). Scale j is
    (scales_l nibble j | bits 2j..2j+1 of scales_h << 4) - 32; x = (d * scale_j) * IQ4_VALUES[code].
    Example: d = 1.0, scale 0 = 1, code 0x8 -> 1.0.
    """
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, 0)
    scales_h = blocks[:, 2:4].contiguous().view(torch.int16).int()  # [n, 1]
    high = (scales_h >> torch.arange(0, 16, 2).view(1, 8)) & 0x03  # [n, 8]
    low = _low_high_nibbles(blocks[:, 4:8]).transpose(1, 2).reshape(num_blocks, 8).int()
    dl = (d * ((low | (high << 4)) - 32).float()).unsqueeze(-1)  # [n, 8, 1]
    codes = _low_high_nibbles(blocks[:, 8:].reshape(num_blocks, 8, 16)).view(num_blocks, 8, 32)
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32)[codes.long()]
    return values.mul_(dl).view(num_blocks, QK_K)


BlockDequantizer = Callable[[torch.Tensor], torch.Tensor]

# [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32, one function per format.
BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, BlockDequantizer] = {
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q5_0: _dequantize_q5_0,
    GGMLQuantizationType.Q5_1: _dequantize_q5_1,
    GGMLQuantizationType.Q4_K: _dequantize_q4_k,
    GGMLQuantizationType.Q5_K: _dequantize_q5_k,
    GGMLQuantizationType.Q6_K: _dequantize_q6_k,
    GGMLQuantizationType.Q2_K: _dequantize_q2_k,
    GGMLQuantizationType.Q3_K: _dequantize_q3_k,
    GGMLQuantizationType.IQ4_XS: _dequantize_iq4_xs,
}

# Plain float formats: torch dtype of the stored elements.
FLOAT_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

SUPPORTED_TYPES = frozenset(BLOCK_DEQUANTIZERS) | frozenset(FLOAT_DTYPES)


def expected_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (torch order) takes in format `qtype`; ValueError if no fit."""
    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"GGUF tensor type {qtype.name} has no known block size")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise ValueError(f"{qtype.name} packs rows in blocks of {block_size} values; "
                         f"shape {tuple(shape)} has rows of {row}")
    return math.prod(shape) // block_size * type_size


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (1-D uint8) -> a new float32 tensor of `shape` (torch order)."""
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported; supported: "
                         f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"expected 1-D uint8 bytes, got {data.dtype} of shape {tuple(data.shape)}")
    nbytes = expected_nbytes(qtype, shape)
    if data.numel() != nbytes:
        raise ValueError(f"{qtype.name} tensor of shape {tuple(shape)} needs {nbytes} bytes, "
                         f"got {data.numel()}")
    if qtype in FLOAT_DTYPES:
        element_size = FLOAT_DTYPES[qtype].itemsize
        if data.storage_offset() % element_size:  # view(dtype) needs an aligned start
            data = data.clone()
        return data.view(FLOAT_DTYPES[qtype]).to(torch.float32, copy=True).view(shape)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = data.view(-1, type_size)
    return BLOCK_DEQUANTIZERS[qtype](blocks).view(shape)
