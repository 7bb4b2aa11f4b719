"""Fast CPU matmul on GGUF quantized weights and paged attention: build and call the C++ kernels.

Q8_0/Q4_0/Q4_1: `repack` turns a tensor's raw GGUF blocks into a `PackedWeight` (losslessly);
`qlinear(x, w)` computes `x @ W^T` with activations quantized to 8 bits per block of 32 and
integer SIMD dot products (csrc/q_gemm.cpp).
K-quants (`KQUANT_TYPES`: Q2_K..Q6_K): `kquant_linear(x, blocks, qtype)` computes on the
file's own block bytes, rows [N, row_bytes], with activations quantized per 256 (Q8_K) and
integer dot products (csrc/k_gemm.cpp; csrc/kquants/kquant.h says how to add a type).
The kernels are compiled for this CPU at first use and cached under `$LEVANTE_HOME/kernels`
(kernel_library.py). Without a C++ compiler both dequantize and use `F.linear`: correct,
slow, and logged once. The same library carries the paged attention kernel
(csrc/paged_attention.cpp: `paged_attention` for any step, `paged_decode_attention` for one
query per sequence), which the engine's KV cache calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from levante.quant.gguf_blocks import dequantize, expected_nbytes
from levante.quant.kernel_library import LoadedKernels, loaded_kernels

BLOCK_SIZE = 32
PANEL_ROWS = 8  # rows interleaved per panel in PackedWeight.qs

# Bytes of each block's fields as stored in the file: (scale, min, quants).
_FIELDS: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    GGMLQuantizationType.Q8_0: (2, 0, 32),
    GGMLQuantizationType.Q4_0: (2, 0, 16),
    GGMLQuantizationType.Q4_1: (2, 2, 16),
}
SUPPORTED_TYPES = frozenset(_FIELDS)
# K-quant types `kquant_linear` takes: the Python side of the registry in csrc/k_gemm.cpp
# (LQ_KQUANT_TYPES); a test checks that the two agree.
KQUANT_TYPES = frozenset({GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
                          GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
                          GGMLQuantizationType.Q6_K})
K_BLOCK_SIZE = 256  # weights per K-quant super-block, and activations per Q8_K block


@dataclass(frozen=True)
class PackedWeight:
    """A [N, K] GGUF block-quantized weight split into the kernel's arrays (nb = K / 32).

    GGUF stores each row as nb blocks of 32 weights; a block is its f16 scale d, (Q4_1) its
    f16 min m, then its quants (Q8_0: 32 int8 values; Q4: 16 bytes, byte j holding value j
    in its low nibble and value j + 16 in its high one). `repack` moves each field into its
    own array, with rows in panels of PANEL_ROWS = 8 (the last panel: N % 8 rows) whose
    bytes are interleaved so that one 32-byte load holds 4 quant bytes of each of 8 rows:
      qs: uint8 [N, nb * 32] (Q8_0) or [N, nb * 16] (Q4_0/Q4_1). Panel p takes its rows'
          bytes, ordered by block, then step t (4 quant bytes 4t..4t+3 of a block, as in
          the file), then row.
      d:  float16 [N, nb]; m: float16 [N, nb] for Q4_1, else None. Within a panel's rows:
          ordered by block, then row.
    A panel's bytes are its rows' bytes, so whole panels slice and stack like rows.
    Example, a Q4_1 row of K = 64 is two 20-byte blocks, bytes (f16 little-endian)
    `00 3C | 00 BC | 21 43 ... (16) | 00 38 | 00 00 | 65 87 ... (16)`: d = [1.0, 0.5],
    m = [-1.0, 0.0]; block 0's values are [1, 3, ..., 2, 4, ...] (value 16 = 0x2). Alone
    (one row), qs is the two blocks' quant bytes: 21 43 ... 65 87 .... With 10 rows, rows
    0..7 form a panel whose qs bytes start with 4 bytes of row 0's block 0, then 4 of row
    1's, ..., row 7's, then bytes 4..7 of row 0's block 0; rows 8, 9 form the last panel.
    Weight j of block b is d*q + m (Q4_1), d*(q - 8) (Q4_0), d*q with q signed (Q8_0).
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # (N, K): output features, input features
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        """Bytes held (equal to the GGUF tensor's size)."""
        extra = self.m.nbytes if self.m is not None else 0
        return self.qs.nbytes + self.d.nbytes + extra

    def rows(self, start: int, end: int) -> PackedWeight:
        """Rows [start, end) as views of these arrays; `start` must begin a panel (a multiple
        of PANEL_ROWS), and `end` end one or the tensor."""
        _check_whole_panels(start, end, self.shape[0])
        return PackedWeight(self.qtype, (end - start, self.shape[1]), self.qs[start:end],
                            self.d[start:end], None if self.m is None else self.m[start:end])

    def to_raw(self) -> torch.Tensor:
        """The GGUF block bytes back (1-D uint8): `repack`'s exact inverse."""
        num_rows, num_blocks = self.d.shape
        fields = [_from_panels(self.d.view(torch.uint8).view(num_rows, num_blocks, 1, 2))]
        if self.m is not None:
            fields.append(_from_panels(self.m.view(torch.uint8).view(num_rows, num_blocks, 1, 2)))
        quant_size = _FIELDS[self.qtype][2]
        fields.append(_from_panels(self.qs.view(num_rows, num_blocks, quant_size // 4, 4)))
        blocks = [f.reshape(num_rows, num_blocks, -1) for f in fields]
        return torch.cat(blocks, dim=-1).reshape(-1)


def repack(qtype: GGMLQuantizationType, raw: torch.Tensor, shape: tuple[int, int]) -> PackedWeight:
    """GGUF bytes of a [N, K] Q8_0/Q4_0/Q4_1 tensor (any uint8 view) -> a `PackedWeight` copy."""
    if qtype not in _FIELDS:
        raise ValueError(f"the quantized matmul kernel takes "
                         f"{', '.join(t.name for t in _FIELDS)}, not {qtype.name}")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight shape (N, K), got {tuple(shape)}")
    nbytes = expected_nbytes(qtype, shape)  # ValueError unless K is whole blocks
    if raw.numel() != nbytes:
        raise ValueError(f"{qtype.name} weight of shape {tuple(shape)} needs {nbytes} bytes, "
                         f"got {raw.numel()}")
    out = empty_packed(qtype, shape)
    repack_into(out, 0, raw)
    return out


def empty_packed(qtype: GGMLQuantizationType, shape: tuple[int, int]) -> PackedWeight:
    """An uninitialized `PackedWeight` of a [N, K] tensor, for `repack_into` to fill."""
    num_rows, num_cols = shape
    expected_nbytes(qtype, shape)  # ValueError unless K is whole blocks
    num_blocks = num_cols // BLOCK_SIZE
    return PackedWeight(qtype, (num_rows, num_cols),
                        torch.empty(num_rows, num_blocks * _FIELDS[qtype][2], dtype=torch.uint8),
                        torch.empty(num_rows, num_blocks, dtype=torch.float16),
                        torch.empty(num_rows, num_blocks, dtype=torch.float16)
                        if _FIELDS[qtype][1] else None)


def repack_into(out: PackedWeight, start: int, raw: torch.Tensor) -> None:
    """Repack GGUF rows `start ..` of `out`'s tensor from `raw` (uint8, those rows' bytes).

    `start` is a multiple of PANEL_ROWS and the rows end on one or at the tensor's end, so the
    rows are whole panels: filling a tensor a chunk at a time gives `repack`'s arrays.
    """
    qtype, (num_rows, num_cols) = out.qtype, out.shape
    if raw.dtype != torch.uint8:
        raise ValueError(f"expected uint8 block bytes, got {raw.dtype}")
    row_bytes = expected_nbytes(qtype, (1, num_cols))
    rows = raw.numel() // row_bytes
    if raw.numel() != rows * row_bytes or start + rows > num_rows:
        raise ValueError(f"{qtype.name} weight of shape {out.shape} needs {row_bytes} bytes a "
                         f"row, got {raw.numel()} bytes for rows {start}.. of it")
    end = start + rows
    _check_whole_panels(start, end, num_rows)
    qs, d = out.qs[start:end], out.d[start:end]
    m = out.m[start:end] if out.m is not None else None
    kernel = _kernel()
    if kernel is not None:
        kernel.repack_blocks(raw.reshape(rows, row_bytes).contiguous(), int(qtype), qs, d, m)
        return
    scale_size, min_size, quant_size = _FIELDS[qtype]
    blocks = raw.reshape(rows, num_cols // BLOCK_SIZE, GGML_QUANT_SIZES[qtype][1])
    quant_start = scale_size + min_size
    _to_panels(blocks[..., 0:scale_size].unflatten(-1, (1, 2)), d.view(torch.uint8))
    if m is not None:
        _to_panels(blocks[..., scale_size:quant_start].unflatten(-1, (1, 2)), m.view(torch.uint8))
    _to_panels(blocks[..., quant_start:].unflatten(-1, (quant_size // 4, 4)), qs)


def _check_whole_panels(start: int, end: int, num_rows: int) -> None:
    """ValueError unless rows [start, end) of `num_rows` begin a panel and end one (or the
    tensor): the rows a PackedWeight's arrays slice and stack like."""
    if start % PANEL_ROWS or (end % PANEL_ROWS and end != num_rows):
        raise ValueError(f"rows {start}..{end} of {num_rows} are not whole {PANEL_ROWS}-row panels")


def _panel_splits(num_rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the whole panels together, then of the last short one."""
    whole = num_rows // PANEL_ROWS * PANEL_ROWS
    return [(start, rows) for start, rows in ((0, whole), (whole, num_rows - whole)) if rows]


def _to_panels(units: torch.Tensor, out: torch.Tensor) -> None:
    """Row-ordered [N, nb, steps, unit] -> panel order in `out` (uint8 [N, nb * steps * unit]).

    The PyTorch path of repack_blocks (csrc/repack.cpp), and its reference in the tests. Each
    unit (1, 2 or 4 bytes) moves as one integer and whole panels move in one strided copy.
    """
    num_rows, num_blocks, steps, _ = units.shape
    elems = _widest_view(units)  # [N, nb, steps, parts]: each unit as 1 (or 2) integers
    parts = elems.shape[-1]
    target = out.view(elems.dtype)
    for start, rows in _panel_splits(num_rows):
        group = min(rows, PANEL_ROWS)
        source = elems[start:start + rows].unflatten(0, (-1, group)).permute(0, 2, 3, 1, 4)
        target[start:start + rows].view(-1, num_blocks, steps, group, parts).copy_(source)


def _widest_view(units: torch.Tensor) -> torch.Tensor:
    """[..., unit] uint8 viewed as [..., unit / w] integers of the widest width w (4, 2, 1
    bytes) that the field's offset and strides allow: a view, never a copy (a copy of
    SmolLM2's Q8_0 output head, whose quants start at byte 2 of each block, was 27 MB more
    at the load's peak)."""
    for width in (4, 2):
        if units.shape[-1] % width == 0:
            try:
                wide = units.view(_UNIT_DTYPES[width])
            except RuntimeError:
                continue
            return wide
    return units


_UNIT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _from_panels(packed: torch.Tensor) -> torch.Tensor:
    """`_to_panels`' inverse: panel order [N, nb, steps, unit] (as viewed) -> row order."""
    num_rows, num_blocks, steps, unit = packed.shape
    parts = []
    for start, rows in _panel_splits(num_rows):
        group = min(rows, PANEL_ROWS)
        part = packed[start:start + rows].reshape(-1, num_blocks, steps, group, unit)
        parts.append(part.permute(0, 3, 1, 2, 4).reshape(rows, num_blocks, steps, unit))
    return torch.cat(parts) if parts else packed


def dequantize_packed(w: PackedWeight) -> torch.Tensor:
    """The float32 [N, K] weight (exactly `gguf_blocks.dequantize` of the original bytes)."""
    return dequantize(w.to_raw(), w.qtype, w.shape)


def linear_dequantized(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The pure-PyTorch path: dequantize the whole weight, then `F.linear` in float32."""
    return F.linear(x.float(), dequantize_packed(w))


def available() -> bool:
    """True if the compiled kernel is loaded (building it on first call, cached after)."""
    return _kernel() is not None


def kernel_isa() -> str | None:
    """What the compiled kernel targets ("avx512+vnni", "avx2+vnni", "avx2", "scalar");
    None if not built."""
    kernel = _kernel()
    return kernel.isa if kernel is not None else None


def qlinear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, computed from 8-bit quantized activations.

    Uses the compiled kernel where available, else `linear_dequantized` (see `available`).
    """
    num_rows, num_cols = w.shape
    if x.shape[-1] != num_cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {num_cols}")
    kernel = _kernel()
    if kernel is not None and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return kernel.qlinear(x, w.qs, w.d, w.m, w.qtype.value)  # decode's case: no copies
    flat = x.reshape(-1, num_cols).to(torch.float32).contiguous()  # [M, K]
    if kernel is None:
        out = linear_dequantized(flat, w)
    else:
        out = kernel.qlinear(flat, w.qs, w.d, w.m, w.qtype.value)
    return out.view(*x.shape[:-1], num_rows).to(x.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's 8-bit rule on x [M, K] float32: (q int8 [M, K], d [M, K/32], s [M, K/32]).

    Per block of 32: d = amax / 127, q = round(x * (127 / amax)) (ties to even; 0 if
    amax = 0), s = d * sum(q). Runs the compiled kernel's code; needs `available()`.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the quantized matmul kernel is not built (see the log)")
    return kernel.quantize_rows(x.to(torch.float32).contiguous())


def kquant_linear(x: torch.Tensor, blocks: torch.Tensor,
                  qtype: GGMLQuantizationType) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W a K-quant weight as the file stores it.

    blocks: uint8 [N, K / 256 * type_size], row n being weight row n's super-blocks exactly as
    in the GGUF file (rows may be reordered whole, as the loader does for q/k). Activations are
    quantized per 256 values (see `quantize_activations_k`); the result is exact integer dot
    products scaled in float32. Uses the compiled kernel where available, else dequantizes
    and calls `F.linear` (see `available`). Bad shapes or dtypes raise RuntimeError from the
    kernel (ValueError on the PyTorch path); a type outside KQUANT_TYPES raises ValueError.
    """
    if qtype not in KQUANT_TYPES:
        raise ValueError(f"kquant_linear takes {', '.join(sorted(t.name for t in KQUANT_TYPES))}"
                         f", not {GGMLQuantizationType(qtype).name}")
    num_cols = x.shape[-1]
    kernel = _kernel()
    if kernel is not None and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return kernel.kquant_linear(x, blocks, int(qtype))  # decode's case: no copies
    flat = x.reshape(-1, num_cols).to(torch.float32).contiguous()  # [M, K]
    if kernel is None:
        num_rows = blocks.shape[0]
        out = F.linear(flat, dequantize(blocks.reshape(-1), qtype, (num_rows, num_cols)))
    else:
        out = kernel.kquant_linear(flat, blocks, int(qtype))
    return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def quantize_activations_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K-quant kernel's 8-bit rule on x [M, K] float32 (llama.cpp's Q8_K, K % 256 == 0).

    Returns (q int8 [M, K], d float32 [M, K/256], bsum int16 [M, K/16]): per block of 256,
    d = amax / 127, q = round(x * (127 / amax)) (ties to even; 0 if amax = 0), and bsum the
    sums of q over each 16 values. x is approximated by d * q. Runs the compiled kernel's code;
    needs `available()`.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the quantized matmul kernel is not built (see the log)")
    return kernel.quantize_rows_k(x.to(torch.float32).contiguous())


def kernel_kquant_types() -> frozenset[GGMLQuantizationType]:
    """The K-quant types the compiled library's registry holds (empty if not built)."""
    kernel = _kernel()
    if kernel is None:
        return frozenset()
    return frozenset(GGMLQuantizationType(t) for t in kernel.kquant_types())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           block_size: int, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """One query token per sequence attending to its paged context; None without the kernel.

    q [B, H, D] float32; k_cache, v_cache [num_blocks * block_size, KV, D] (one layer's pool)
    in float32, bfloat16, float16, or int8 with float16 `k_scales`/`v_scales`
    [slots, KV, D // 32] (q8_0: value j is cache[j] * scales[j // 32]), widened to float32
    exactly as read; block_tables [B, max_blocks] int64; context_lens [B] int64. Sequence b's
    token t is in slot `block_tables[b, t // block_size] * block_size + t % block_size`, and
    query head h reads KV head h // (H // KV). Returns softmax(q k^T / sqrt(D)) v as [B, H, D],
    computed in place from the pool (csrc/paged_attention.cpp). Bad input (dtype, shape, a
    block id outside the pool, a context longer than its table) raises RuntimeError.
    """
    kernel = _kernel()
    if kernel is None:
        return None
    return kernel.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         block_size, q.shape[-1] ** -0.5, k_scales, v_scales)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_lens: torch.Tensor, *, block_size: int,
                    k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """Each sequence's new query tokens attending causally to its paged context; None without
    the kernel.

    q [T, H, D] float32 holds the step's new tokens, sequence by sequence: sequence b brings
    `query_lens[b]` of them, the last ones of its `context_lens[b]`, so its query i sits at
    position `context_lens[b] - query_lens[b] + i` and attends to keys 0 .. that position.
    Caches, tables and GQA as `paged_decode_attention`; returns [T, H, D]. Each query's result
    is bit-identical to `paged_decode_attention` of that token alone with context = its
    position + 1: it depends on neither the chunking nor the batch. Bad input raises
    RuntimeError.
    """
    kernel = _kernel()
    if kernel is None:
        return None
    return kernel.paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_lens,
                                  block_size, q.shape[-1] ** -0.5, k_scales, v_scales)


def _kernel() -> LoadedKernels | None:
    """The loaded kernels, or None for the PyTorch path (decided once per process)."""
    return loaded_kernels()
