"""The Triton kernels behind `triton_matmul.row_scaled_matmul` (see its docstring for why and
how); this module imports triton, so it is imported only when a kernel first runs.

`gemv` / `gemm` are the raw kernels (tests run each config through Triton's interpreter);
`gemv_tuned` / `gemm_tuned` pick a config per shape on first use, timed on the GPU.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, stages). The float32 tile BLOCK_N x BLOCK_K stays in registers
# (<= 64 per thread); a narrow BLOCK_N gives N = 5120 (o_proj, down_proj) 80-1280 programs.
GEMV_SHAPES = [(16, 512, 4, 3), (32, 256, 4, 4), (8, 1024, 4, 3), (4, 2048, 4, 3),
               (64, 256, 8, 3), (16, 1024, 8, 3), (32, 512, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); `_prune_gemm` keeps those whose BLOCK_M suits M.
GEMM_SHAPES = [(16, 32, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
               (32, 64, 256, 4, 3), (32, 128, 128, 4, 4),
               (64, 64, 128, 4, 4), (64, 128, 128, 8, 3),
               (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]
GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in GEMV_SHAPES]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                              num_stages=s) for m, n, k, w, s in GEMM_SHAPES]


# Masked-off codes are loaded without a fill value (Triton cannot cast one to float8) and
# zeroed after conversion: an undefined fp8 byte may be NaN, and NaN * 0 is NaN.


@triton.jit
def gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]  # Triton values
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc += tl.where(k_mask[None, :], w.to(tl.float32), 0.0) * x[None, :]
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,  # type: ignore[no-untyped-def]
         M_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = (x @ w^T) * s for x [M, K]; program (i, j) owns rows i*BLOCK_M.. and columns
    j*BLOCK_N..; i runs fastest, so programs sharing a weight tile run side by side."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = offs_k < K - start
        x = tl.load(x_ptrs + start, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + start, mask=k_mask[:, None] & n_mask[None, :])
        acc = tl.dot(x, tl.where(k_mask[:, None], w.to(x.dtype), 0.0), acc)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _prune_gemm(configs: list[Any], named_args: dict[str, Any], **_: Any) -> list[Any]:
    """The configs whose BLOCK_M is the smallest covering the M bucket (128 for prefill)."""
    block_m = min(max(16, named_args["M_BUCKET"]), 128)
    return [c for c in configs if c.kwargs["BLOCK_M"] == block_m]


gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K"])(gemv)
gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                             prune_configs_by={"early_config_prune": _prune_gemm})(gemm)
