"""Weight-only matmuls for CUDA in Triton, the codes read as they are stored:
`row_scaled_matmul`, y = x @ (codes * scales[:, None])^T for int8 or float8_e4m3fn codes
[N, K] with one f32 scale per output row; `int4_matmul`, Int4Linear's nibbles and group
scales and zeros.

Why a kernel of our own: batch-1 decode reads every weight once per token, so an 8-bit weight
can only beat bf16 if the matmul reads 1 byte per weight and nothing else. Eager PyTorch cannot:
`codes.to(bf16)` then `F.linear` writes and re-reads a 2-byte copy (5 bytes per weight, H200:
int8 1291 us vs bf16's 106 us for one 32768x5120 layer when it scaled a float32 copy), and
fp8's `torch._scaled_mm` with row-wise scales ran at 659 GB/s at M = 1 (254 us, fp8 decode
62 tok/s vs bf16's 73). gpt-fast gets the fused read from torch.compile; Levante's decode is
recorded as CUDA graphs without compiling the model, so the fusion is written out here: each
program loads a tile of codes, converts it in registers, and multiplies (PyTorch's own int8
kernel, `_weight_int8pack_mm`, exists for CPU and MPS only).

Two kernels, chosen by the number of rows M of x:
- M = 1 (batch-1 decode, the headline figure): a GEMV; each program owns BLOCK_N output rows
  and walks K, accumulating w * x in float32 registers, reduced once at the end.
- M > 1: tiles of BLOCK_M x BLOCK_N through `tl.dot` with the codes converted to x's dtype; the
  program index runs over M fastest, so the programs that share a weight tile run together and
  the tile is read from HBM about once (from L2 after).
Both scale each output column at the end (the scale is per output row of the weight, so it
commutes with the sum) and are autotuned per (N, K, M bucket) on first use: outside a CUDA
graph capture, as DecodeGraphs warms each size up before recording it. int4 has the same two
shapes (`triton_kernels`). Measured on an H200 (benchmarks/gpu.py, Mistral Small 3's shape):
one 32768x5120 layer at batch 1 in 100 us (int8) and 98 us (fp8) against bf16 cuBLAS's 97 us
for twice the bytes; decode 95.8 (int8) and 105.7 tok/s (fp8) against bf16's 74.3. The GEMV
reads 2.1-2.3 TB/s where cuBLAS reads bf16 at 3.2-3.5: that gap is what is left to 150 tok/s.

Triton ships with PyTorch's CUDA wheels; it is imported only here, only when a CUDA layer
runs (the kernels are in `triton_kernels`, which imports it). `TRITON_INTERPRET=1` runs the same
kernels on CPU tensors: tests/quant/test_triton_matmul.py checks every config that way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)  # what `tl.dot` takes the codes in
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)


def available(device: torch.device | str) -> bool:
    """Whether the kernels run for tensors on `device`: a CUDA device with Triton installed
    (or any device under TRITON_INTERPRET=1, the interpreter the CPU tests use)."""
    return _has_triton() and (torch.device(device).type == "cuda"
                              or os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def takes_codes(codes: torch.Tensor) -> bool:
    """Whether `row_scaled_matmul` reads these codes where they are (a layer decides once;
    each call then needs only activations in ACTIVATION_DTYPES)."""
    return (codes.dtype in CODE_DTYPES and codes.dim() == 2 and codes.is_contiguous()
            and available(codes.device))


def m_bucket(rows: int) -> int:
    """The autotuning key for M: 1, then powers of two up to 128 (decode batches), then 256
    for every larger M (prefill chunks share one tuned config)."""
    return 1 if rows == 1 else min(256, 1 << (rows - 1).bit_length())


def row_scaled_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16/f16) @ (codes [N, K] * scales [N, 1])^T -> [..., N] in x's dtype."""
    from levante.quant import triton_kernels as kernels  # imports triton: only on first use

    def one_row(flat: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
        kernels.gemv_tuned[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](
            flat, codes, scales, out, n, k)

    def many_rows(flat: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
        rows = flat.shape[0]
        kernels.gemm_tuned[lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))](
            flat, codes, scales, out, rows, n, k, flat.stride(0), out.stride(0), m_bucket(rows))

    return _by_rows(x, codes.shape[0], codes.shape[1], one_row, many_rows)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [..., K] (bf16/f16) @ w^T for one plane of `linear.Int4Linear`'s Triton layout: packed
    [N, K/2] nibbles, scales_and_zeros [2, N, K/group_size] (S, then Z), w = (u - 8) * S + Z."""
    from levante.quant import triton_kernels as kernels

    def one_row(flat: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
        kernels.int4_gemv_tuned[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](
            flat, packed, scales_and_zeros, out, n, k, GROUP=group_size)

    def many_rows(flat: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
        rows = flat.shape[0]
        kernels.int4_gemm_tuned[lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))](
            flat, packed, scales_and_zeros, out, rows, n, k, flat.stride(0), out.stride(0),
            m_bucket(rows), GROUP=group_size)

    return _by_rows(x, packed.shape[0], 2 * packed.shape[1], one_row, many_rows)


Launch = Callable[[torch.Tensor, torch.Tensor, int, int], None]


def _by_rows(x: torch.Tensor, n: int, k: int, one_row: Launch, many_rows: Launch
             ) -> torch.Tensor:
    """x flattened to [M, K] (rows contiguous), `one_row` or `many_rows` writing [M, n] into a
    new tensor, reshaped to [..., n]; a ValueError unless x's width is the weight's K (the
    kernels would read past the codes)."""
    if x.shape[-1] != k:
        raise ValueError(f"input width {x.shape[-1]} does not match the weight's {k}")
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], n, dtype=x.dtype, device=x.device)
    if flat.shape[0] == 1:
        one_row(flat, out, n, flat.shape[1])
    elif flat.shape[0] > 1:
        many_rows(flat, out, n, flat.shape[1])
    return out.reshape(*x.shape[:-1], n)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
