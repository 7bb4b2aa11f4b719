"""The Triton kernels behind `triton_matmul.row_scaled_matmul` (see its docstring for why and
how); this module imports triton, so it is imported only when a kernel first runs.

`gemv` / `gemm` are the raw kernels (tests run each config through Triton's interpreter);
`gemv_tuned` / `gemm_tuned` pick a config per shape on first use, timed on the GPU. Besides
tile sizes, the configs choose between two ways of doing the same arithmetic:

- gemv MAGIC (int8 codes only): the int8 -> float conversion instruction runs at 16 per clock
  per SM on Hopper (CUDA's throughput table), ~40 us for one 32768x5120 layer on an H200
  against ~35 us to read it. With MAGIC the code's byte is put into the mantissa of 2^23 by
  one integer op and the offset subtracted: (2^23 + (c + 128)) - (2^23 + 128) = c, exact, on
  the integer and float pipes. Measured there: 78-80 us against 85-88 us for the same tiles.
- gemm SWAP: computes y^T = w @ x^T, so the converted weight tile is the first operand of
  the matrix instruction (Hopper's wgmma takes that one from registers, the second only from
  shared memory) and a few tokens fill its narrow side, as decode batches need. Measured
  there on that layer: 16 tokens 96 us against 111 us, 256 tokens 259 us against 300 us.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, stages). The float32 tile BLOCK_N x BLOCK_K stays in registers
# (<= 64 per thread); a narrow BLOCK_N gives N = 5120 (o_proj, down_proj) 160-1280 programs.
# Each shape runs with and without MAGIC (`_prune_gemv` drops MAGIC for float8 codes).
GEMV_SHAPES = [(16, 512, 4, 3), (32, 256, 4, 4), (8, 1024, 4, 3), (4, 2048, 4, 3),
               (32, 512, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP); `_prune_gemm` keeps those whose BLOCK_M
# suits M. SWAP tiles put BLOCK_N on the matrix instruction's 64-row side.
GEMM_SHAPES = [(16, 32, 256, 4, 4, False), (16, 64, 256, 4, 3, False),
               (16, 128, 128, 4, 4, False), (16, 64, 256, 4, 4, True), (16, 128, 128, 4, 4, True),
               (32, 64, 256, 4, 3, False), (32, 128, 128, 4, 4, False),
               (32, 64, 256, 4, 4, True), (32, 128, 128, 4, 4, True),
               (64, 64, 128, 4, 4, False), (64, 128, 128, 8, 3, False),
               (64, 128, 128, 4, 4, True),
               (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False),
               (128, 128, 128, 8, 3, False), (128, 128, 64, 8, 3, True)]
GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "MAGIC": magic}, num_warps=w,
                              num_stages=s)
                for magic in (False, True) for n, k, w, s in GEMV_SHAPES]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP": swap},
                              num_warps=w, num_stages=s) for m, n, k, w, s, swap in GEMM_SHAPES]
# 2^23's bits, with the bit that turns a two's complement byte c into c + 128; and 2^23 + 128
MAGIC_BITS = tl.constexpr(0x4B000080)
MAGIC_OFFSET = tl.constexpr(8388736.0)


# Masked-off codes are loaded without a fill value (Triton cannot cast one to float8) and
# zeroed after conversion: an undefined fp8 byte may be NaN, and NaN * 0 is NaN.


@triton.jit
def gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]  # Triton values
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr):
    """y[n] = s[n] * sum_k w[n, k] x[k] for one row x; BLOCK_N outputs per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = offs_k < K - start
        x = tl.load(x_ptr + start + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + start, mask=n_mask[:, None] & k_mask[None, :])
        if MAGIC:
            bits = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ MAGIC_BITS
            wf = bits.to(tl.float32, bitcast=True) - MAGIC_OFFSET
        else:
            wf = w.to(tl.float32)
        acc += tl.where(k_mask[None, :], wf, 0.0) * x[None, :]
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,  # type: ignore[no-untyped-def]
         M_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         SWAP: tl.constexpr):
    """y = (x @ w^T) * s for x [M, K]; program (i, j) owns rows i*BLOCK_M.. and columns
    j*BLOCK_N..; i runs fastest, so programs sharing a weight tile run side by side."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    if SWAP:  # acc [BLOCK_N, BLOCK_M] = w [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k_mask = offs_k < K - start
            xt = tl.load(x_ptrs + start, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + start, mask=n_mask[:, None] & k_mask[None, :])
            acc_t = tl.dot(tl.where(k_mask[None, :], w.to(xt.dtype), 0.0), xt, acc_t)
        y_t = acc_t * scale[:, None]
        y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, y_t.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k_mask = offs_k < K - start
            x = tl.load(x_ptrs + start, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + start, mask=k_mask[:, None] & n_mask[None, :])
            acc = tl.dot(x, tl.where(k_mask[:, None], w.to(x.dtype), 0.0), acc)
        y = acc * scale[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _prune_gemv(configs: list[Any], named_args: dict[str, Any], **_: Any) -> list[Any]:
    """MAGIC reads the codes as two's complement bytes: int8 only."""
    if named_args["w_ptr"].dtype == torch.int8:
        return configs
    return [c for c in configs if not c.kwargs["MAGIC"]]


def _prune_gemm(configs: list[Any], named_args: dict[str, Any], **_: Any) -> list[Any]:
    """The configs whose BLOCK_M is the smallest covering the M bucket (128 for prefill)."""
    block_m = min(max(16, named_args["M_BUCKET"]), 128)
    return [c for c in configs if c.kwargs["BLOCK_M"] == block_m]


gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K"],
                             prune_configs_by={"early_config_prune": _prune_gemv})(gemv)
gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                             prune_configs_by={"early_config_prune": _prune_gemm})(gemm)


# 4-bit codes, Levante's portable layout (`linear.pack_nibbles`: column 2j in the low nibble
# of byte j, 2j+1 in the high one) with bf16 scales and zeros [2, N, K/GROUP] (each row's
# scales contiguous, then its zeros) per group of GROUP inputs: w = (u - 8) * S + Z. A tile is
# read as [rows, groups, GROUP/2 bytes], so each group's scale broadcasts over its bytes; a
# nibble becomes u - 8 by the mantissa trick above ((2^23 + u) - (2^23 + 8)), no conversion
# instruction. The GEMV's ONE_PLUS variant skips that subtraction: the nibble shifted into the
# top of the mantissa of 1.0 is f = 1 + u/16, and per group sum (u - 8) x = 16 sum f x - 24 sum x.
INT4_MAGIC_OFFSET = tl.constexpr(8388616.0)  # 2^23 + 8
INT4_MAGIC_BITS = tl.constexpr(0x4B000000)
ONE_BITS = tl.constexpr(0x3F800000)  # 1.0
# (BLOCK_N, BLOCK_K, warps, stages); `_prune_int4` drops tiles narrower than a group.
INT4_GEMV_SHAPES = [(16, 256, 4, 3), (32, 256, 4, 3), (8, 512, 4, 3), (16, 512, 4, 3),
                    (4, 1024, 4, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): y^T = w @ x^T, as gemm's SWAP
INT4_GEMM_SHAPES = [(16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3),
                    (32, 64, 128, 4, 3), (32, 128, 128, 4, 3), (32, 64, 256, 4, 3),
                    (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (64, 64, 256, 4, 3),
                    (128, 128, 128, 8, 3), (128, 128, 256, 8, 2)]
INT4_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "ONE_PLUS": one_plus},
                                   num_warps=w, num_stages=s)
                     for one_plus in (False, True) for n, k, w, s in INT4_GEMV_SHAPES]
INT4_GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                                   num_stages=s) for m, n, k, w, s in INT4_GEMM_SHAPES]


@triton.jit
def _int4_minus_8(nibbles):  # type: ignore[no-untyped-def]
    """uint8 values 0..15 -> float32 u - 8, exact."""
    bits = nibbles.to(tl.int32) | INT4_MAGIC_BITS
    return bits.to(tl.float32, bitcast=True) - INT4_MAGIC_OFFSET


@triton.jit
def _one_plus_sixteenth(nibbles_high):  # type: ignore[no-untyped-def]
    """uint8 values with u in the high nibble (low nibble zero) -> float32 1 + u/16, exact."""
    return ((nibbles_high.to(tl.int32) << 15) | ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def int4_gemv(x_ptr, w_ptr, sz_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              ONE_PLUS: tl.constexpr):
    """y[n] = sum_k w[n, k] x[k] for one row x: per group, S * sum (u - 8) x + Z * sum x."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_j = tl.arange(0, HALF)
    n_mask = offs_n < N
    num_groups = K // GROUP
    w_ptrs = (w_ptr + offs_n[:, None, None].to(tl.int64) * (K // 2)
              + offs_g[None, :, None] * HALF + offs_j[None, None, :])
    x_ptrs = x_ptr + offs_g[:, None] * GROUP + 2 * offs_j[None, :]
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        g_mask = offs_g < num_groups - g0
        b = tl.load(w_ptrs + g0 * HALF, mask=n_mask[:, None, None] & g_mask[None, :, None],
                    other=0)
        xe = tl.load(x_ptrs + g0 * GROUP, mask=g_mask[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptrs + g0 * GROUP + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
        xs = tl.sum(xe + xo, axis=1)
        if ONE_PLUS:
            f = tl.sum(_one_plus_sixteenth(b << 4) * xe[None] + _one_plus_sixteenth(b & 0xF0)
                       * xo[None], axis=2)
            p = 16.0 * f - 24.0 * xs[None, :]
        else:
            p = tl.sum(_int4_minus_8(b & 0xF) * xe[None] + _int4_minus_8(b >> 4) * xo[None],
                       axis=2)
        s_ptrs = sz_ptr + offs_n[:, None].to(tl.int64) * num_groups + (g0 + offs_g)[None, :]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptrs, mask=sz_mask, other=0.0).to(tl.float32)  # [BLOCK_N, GROUPS]
        z = tl.load(s_ptrs + N * num_groups, mask=sz_mask, other=0.0).to(tl.float32)
        acc += s * p + z * xs[None, :]
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def int4_gemm(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, stride_xm,  # type: ignore[no-untyped-def]
              stride_ym, M_BUCKET, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y^T [BLOCK_N, BLOCK_M] tiles = w @ x^T, the even and odd inputs as two dots."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_j = tl.arange(0, HALF)
    offs_h = tl.arange(0, BLOCK_K // 2)
    m_mask, n_mask = offs_m < M, offs_n < N
    num_groups = K // GROUP
    w_ptrs = (w_ptr + offs_n[:, None, None].to(tl.int64) * (K // 2)
              + offs_g[None, :, None] * HALF + offs_j[None, None, :])
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + 2 * offs_h[:, None]  # [K/2, M]
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        g_mask = offs_g < num_groups - g0
        h_mask = offs_h < (num_groups - g0) * HALF
        b = tl.load(w_ptrs + g0 * HALF, mask=n_mask[:, None, None] & g_mask[None, :, None],
                    other=0)
        s_ptrs = sz_ptr + offs_n[:, None].to(tl.int64) * num_groups + (g0 + offs_g)[None, :]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptrs, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(s_ptrs + N * num_groups, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
        xe = tl.load(x_ptrs + g0 * GROUP, mask=h_mask[:, None] & m_mask[None, :], other=0.0)
        xo = tl.load(x_ptrs + g0 * GROUP + 1, mask=h_mask[:, None] & m_mask[None, :], other=0.0)
        w_even = tl.reshape(_int4_minus_8(b & 0xF) * s + z, (BLOCK_N, BLOCK_K // 2))
        w_odd = tl.reshape(_int4_minus_8(b >> 4) * s + z, (BLOCK_N, BLOCK_K // 2))
        acc_t = tl.dot(w_even.to(xe.dtype), xe, acc_t)
        acc_t = tl.dot(w_odd.to(xo.dtype), xo, acc_t)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc_t.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def _prune_int4(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Tiles holding whole groups; for the GEMM, BLOCK_M as `_prune_gemm` picks it."""
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] % group == 0]
    if "M_BUCKET" in named_args:
        kept = _prune_gemm(kept, named_args)
    return kept


int4_gemv_tuned = triton.autotune(configs=INT4_GEMV_CONFIGS, key=["N", "K", "GROUP"],
                                  prune_configs_by={"early_config_prune": _prune_int4})(int4_gemv)
int4_gemm_tuned = triton.autotune(configs=INT4_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP"],
                                  prune_configs_by={"early_config_prune": _prune_int4})(int4_gemm)
