"""GGUF K-quant quantizers: float32 super-blocks of 256 values -> Q2_K..Q6_K block bytes.

llama.cpp's reference quantizers without an importance matrix (ggml-quants.c:
`quantize_row_q{2..6}_K_ref`), bit for bit: each type's scale search runs in
levante.quant.k_quant_search; this module quantizes the scales themselves and packs scales
and codes into the type's bytes. The tests check the bytes against llama.cpp's C library where
one is installed. Byte layouts: `levante.quant.gguf_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from levante.quant.k_quant_search import (
    F32,
    GROUP_MAX_EPS,
    f16_bits_and_value,
    make_q3,
    make_qkx2,
    make_qx,
    nearest_int,
    requantize,
    sequential_sum,
    signed_max,
)

Q = GGMLQuantizationType
CHUNK_BLOCKS = 1024  # super-blocks per pass: keeps temporaries ~10 MB and in cache

# Expressions below keep C's operand order: `w * x * l` is (w * x) * l, all float32.


def _groups(blocks: np.ndarray, size: int) -> np.ndarray:
    """[n_blocks, 256] -> [size, n_blocks * 256 / size]: group g of block b is column b*k + g."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _ungroup(codes: np.ndarray, num_blocks: int) -> np.ndarray:
    """Inverse of `_groups`: [size, n_groups] -> [n_blocks, 256]."""
    return codes.T.reshape(num_blocks, QK_K)


def _pack_k4_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block [n, 8] -> the 12-byte table (`_k_scales_mins`)."""
    table = np.zeros((scales.shape[0], 12), np.uint8)
    table[:, 0:4] = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    table[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    table[:, 8:12] = (scales[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    return table


def _quantize_qkx(blocks: np.ndarray, nmax: int, rmin: float,
                  nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared Q4_K / Q5_K body: (f16 d bits, f16 dmin bits, 12 scale bytes, codes [n, 256])."""
    num_blocks = blocks.shape[0]
    x = _groups(blocks, 32)  # [32, n * 8]
    av_x = np.sqrt(sequential_sum(x * x) / F32(32))
    codes, scales, mins = make_qkx2(x, av_x + np.abs(x), nmax, rmin, 0.1, nstep,
                                    use_mad=False)
    scales, mins = scales.reshape(num_blocks, 8), mins.reshape(num_blocks, 8)
    max_scale = np.fmax.reduce(scales, axis=1, initial=F32(0))
    # + 0 turns a -0.0 (all mins -0.0) into llama.cpp's +0.0: it keeps 0 unless a min is > 0
    max_min = np.fmax.reduce(mins, axis=1, initial=F32(0)) + F32(0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))[:, None]
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))[:, None]
    q_scales = np.minimum(nearest_int(inv_scale * scales) & 0xFF, 63).astype(np.uint8)
    q_mins = np.minimum(nearest_int(inv_min * mins) & 0xFF, 63).astype(np.uint8)
    d_bits, d = f16_bits_and_value(max_scale / F32(63))
    dmin_bits, dmin = f16_bits_and_value(max_min / F32(63))
    step = (d[:, None] * q_scales.astype(F32)).reshape(-1)
    offset = (dmin[:, None] * q_mins.astype(F32)).reshape(-1)
    codes = requantize(x, step, offset, 0, nmax, codes, 0)
    return d_bits, dmin_bits, _pack_k4_scales(q_scales, q_mins), _ungroup(codes, num_blocks)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, 256] codes (low 4 bits used) -> [n, 128]: chunk c holds values 64c.. (low), 64c+32.."""
    low = codes.reshape(-1, 4, 2, 32) & 0x0F
    return (low[:, :, 0] | (low[:, :, 1] << 4)).astype(np.uint8).reshape(-1, 128)


def _f16_bytes(bits: np.ndarray) -> np.ndarray:
    """uint16 [n] -> [n, 2] little-endian bytes."""
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q4_K [n, 144]: d, dmin, 12 scale bytes, 128 nibble bytes."""
    d, dmin, table, codes = _quantize_qkx(blocks, 15, -1.0, 20)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), table, _pack_nibbles(codes)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q5_K [n, 176]: d, dmin, 12 scale bytes, 32 bytes qh, 128 nibbles.

    Bit j of qh[l] is bit 4 of value l of sub-block j (value 32j + l).
    """
    d, dmin, table, codes = _quantize_qkx(blocks, 31, -0.5, 15)
    fifth = (codes.reshape(-1, 8, 32) >> 4) << np.arange(8, dtype=np.int32)[None, :, None]
    qh = np.bitwise_or.reduce(fifth, axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), table, qh, _pack_nibbles(codes)],
                          axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q6_K [n, 210]: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d."""
    num_blocks = blocks.shape[0]
    x = _groups(blocks, 16)  # [16, n * 16]
    codes, scales = make_qx(x, 32)
    scales = scales.reshape(num_blocks, 16)
    max_scale, max_abs = signed_max(scales, 1)
    is_zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d_bits, d = f16_bits_and_value(F32(1) / iscale)
        q_scales = np.minimum(nearest_int(iscale[:, None] * scales), 127)
    q_scales = ((q_scales + 128) & 0xFF) - 128  # stored as int8
    step = (d[:, None] * q_scales.astype(F32)).reshape(-1)
    codes = _ungroup(requantize(x, step, None, -32, 31, codes, 32), num_blocks)
    parts = codes.reshape(num_blocks, 2, 4, 32)  # [n, half, quarter t, l]: value 128h + 32t + l
    low = parts & 0x0F
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = (parts >> 4) << (2 * np.arange(4, dtype=np.int32))[None, None, :, None]
    qh = np.bitwise_or.reduce(high, axis=2)
    out = np.concatenate([ql.reshape(num_blocks, 128).astype(np.uint8),
                          qh.reshape(num_blocks, 64).astype(np.uint8),
                          q_scales.astype(np.int8).view(np.uint8), _f16_bytes(d_bits)], axis=1)
    out[is_zero] = 0
    return out


def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q3_K [n, 110]: 32 bytes hmask, 64 bytes 2-bit q, 12 scale bytes, f16 d.

    Scale j (6 bits, stored + 32): low nibble in byte j % 8 (j < 8 low half, else high
    half), top 2 bits at bits 2(j // 4) of byte 8 + j % 4.
    """
    num_blocks = blocks.shape[0]
    x = _groups(blocks, 16)  # [16, n * 16]
    codes, scales = make_q3(x, 4)
    scales = scales.reshape(num_blocks, 16)
    max_scale, _ = signed_max(scales, 1)
    has_scale = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        d_bits, d = f16_bits_and_value(F32(1) / iscale)
        levels = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t in C
    levels = np.where(has_scale[:, None], np.clip(levels, -32, 31) + 32, 0)
    d_bits = np.where(has_scale, d_bits, np.uint16(0))
    d = np.where(has_scale, d, F32(0))
    table = np.zeros((num_blocks, 12), np.int32)
    table[:, :8] = (levels[:, :8] & 0x0F) | ((levels[:, 8:] & 0x0F) << 4)
    top = (levels >> 4).reshape(num_blocks, 4, 4) << (2 * np.arange(4))[None, :, None]
    table[:, 8:] = np.bitwise_or.reduce(top, axis=1)
    step = (d[:, None] * (levels - 32).astype(F32)).reshape(-1)
    codes = _ungroup(requantize(x, step, None, -4, 3, codes, 4), num_blocks)
    high = (codes > 3).reshape(num_blocks, 8, 32) << np.arange(8)[None, :, None]
    hmask = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([hmask.astype(np.uint8), _pack_2bit(codes & 3),
                           table.astype(np.uint8), _f16_bytes(d_bits)], axis=1)


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    """[n, 256] codes 0..3 -> [n, 64]: byte 32h + l holds values 128h + 32s + l at bits 2s."""
    parts = codes.reshape(-1, 2, 4, 32) << (2 * np.arange(4))[None, None, :, None]
    return np.bitwise_or.reduce(parts, axis=2).astype(np.uint8).reshape(-1, 64)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q2_K [n, 84]: 16 scale|min bytes, 64 bytes 2-bit q, f16 d, f16 dmin."""
    num_blocks = blocks.shape[0]
    x = _groups(blocks, 16)  # [16, n * 16]
    codes, scales, mins = make_qkx2(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(num_blocks, 16), mins.reshape(num_blocks, 16)
    max_scale = np.fmax.reduce(scales, axis=1, initial=F32(0))
    max_min = np.fmax.reduce(mins, axis=1, initial=F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        q_scales = nearest_int((F32(15) / max_scale)[:, None] * scales) & 0xFF
        q_mins = nearest_int((F32(15) / max_min)[:, None] * mins)
    q_scales = np.where((max_scale > 0)[:, None], q_scales, 0)
    packed = np.where((max_min > 0)[:, None], (q_scales | (q_mins << 4)) & 0xFF, q_scales)
    d_bits, d = f16_bits_and_value(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin_bits, dmin = f16_bits_and_value(np.where(max_min > 0, max_min / F32(15), F32(0)))
    step = (d[:, None] * (packed & 0x0F).astype(F32)).reshape(-1)
    offset = (dmin[:, None] * (packed >> 4).astype(F32)).reshape(-1)
    codes = _ungroup(requantize(x, step, offset, 0, 3, codes, 0), num_blocks)
    return np.concatenate([packed.astype(np.uint8), _pack_2bit(codes), _f16_bytes(d_bits),
                           _f16_bytes(dmin_bits)], axis=1)


BlockQuantizer = Callable[[np.ndarray], np.ndarray]

# float32 [n_blocks, 256] -> uint8 [n_blocks, type_size], one function per format.
K_QUANTIZERS: dict[GGMLQuantizationType, BlockQuantizer] = {
    Q.Q2_K: quantize_q2_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
}


# Where each type keeps its f16 super-block scales (d, and dmin where it has one).
F16_SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def quantize(values: np.ndarray, qtype: GGMLQuantizationType, *,
             num_threads: int = 1) -> np.ndarray:
    """float32 [..., K] (K a multiple of 256) -> uint8 [..., K / 256 * type_size] of `qtype`.

    Runs CHUNK_BLOCKS super-blocks at a time (on `num_threads` threads: numpy releases the
    GIL inside its loops), so temporaries stay small whatever the size. Raises ValueError for
    a row that is not whole super-blocks, a non-finite value, or values so large that a
    block's f16 scale would overflow (llama.cpp writes an infinite scale there).
    """
    if qtype not in K_QUANTIZERS:
        raise ValueError(f"no K-quant quantizer for {qtype.name}; have "
                         f"{', '.join(t.name for t in K_QUANTIZERS)}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if values.ndim == 0 or values.shape[-1] % block_size:
        raise ValueError(f"{qtype.name} packs rows of whole {block_size}-value super-blocks; "
                         f"got shape {values.shape}")
    blocks = np.ascontiguousarray(values, dtype=F32).reshape(-1, block_size)
    out = np.empty((blocks.shape[0], type_size), np.uint8)

    def run(start: int) -> None:
        chunk = blocks[start:start + CHUNK_BLOCKS]
        if not np.isfinite(chunk).all():
            raise ValueError(f"cannot quantize non-finite values (inf or nan) to {qtype.name}")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            packed = K_QUANTIZERS[qtype](chunk)
        for offset in F16_SCALE_OFFSETS[qtype]:
            if not np.isfinite(packed[:, offset:offset + 2].copy().view(np.float16)).all():
                raise ValueError(f"values up to {float(np.abs(chunk).max()):.3g} overflow "
                                 f"{qtype.name}'s f16 block scale")
        out[start:start + CHUNK_BLOCKS] = packed

    starts = range(0, blocks.shape[0], CHUNK_BLOCKS)
    if num_threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(run, starts))
    else:
        for start in starts:
            run(start)
    return out.reshape(*values.shape[:-1], values.shape[-1] // block_size * type_size)
