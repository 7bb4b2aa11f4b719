"""Torch modules over GGUF blocks kept quantized: a linear per way a type computes, embeddings.

How each GGUF type computes (`kernel_summary` says it per model; `levante generate --verbose`
and the server's startup log print it):
- Q8_0, Q4_0, Q4_1: `kernels.repack` splits the file's blocks into arrays, losslessly, and
  `kernels.qlinear` runs llama.cpp-style integer dot products on them (`BlockKernelLinear`).
- K-quants with a compiled kernel (`kernels.KQUANT_TYPES`: Q4_K, Q6_K, ...): the file's own
  blocks, row-major, run by `kernels.kquant_linear` (8-bit activations per 256, integer dots:
  `KQuantLinear`).
- Other types `gguf_blocks` reads (e.g. Q2_K, IQ4_XS): the raw blocks are kept and one layer's
  weight is dequantized just in time per call, slow, and logged as such at load
  (`RawBlockLinear`).
- F32/F16/BF16: a plain nn.Linear in the model dtype.
Building a model of them (from a GGUF file, or a float checkpoint quantized at load):
levante.quant.gguf_model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from levante.model import stacked_view
from levante.quant import kernels
from levante.quant.gguf_blocks import dequantize
from levante.quant.linear import Int4Linear
from levante.weights.gguf import GGUFFile


class BlockKernelLinear(nn.Module):
    """A Q8_0/Q4_0/Q4_1 weight as `kernels.repack` lays it out, run by `kernels.qlinear`."""

    def __init__(self, weight: kernels.PackedWeight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_packed = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.qlinear(x, self.weight_packed)

    @classmethod
    def concat(cls, parts: Sequence[nn.Module]) -> BlockKernelLinear | None:
        """The parts stacked by output rows (`model.RowConcatenable`); they become views.

        Rows are interleaved in panels of 8 (`kernels.PackedWeight`), so every part but the
        last must have a multiple of 8 rows for the stacked arrays to be the stacked layout.
        """
        weights = [p.weight_packed for p in parts if isinstance(p, BlockKernelLinear)]
        if len(weights) != len(parts) or len({(w.qtype, w.shape[1]) for w in weights}) != 1 \
                or any(w.shape[0] % kernels.PANEL_ROWS for w in weights[:-1]):
            return None
        mins = [m for m in (w.m for w in weights) if m is not None]
        joined = kernels.PackedWeight(
            weights[0].qtype, (sum(w.shape[0] for w in weights), weights[0].shape[1]),
            _stack([w.qs for w in weights]), _stack([w.d for w in weights]),
            _stack(mins) if mins else None)
        start = 0
        for part, w in zip(parts, weights):
            assert isinstance(part, BlockKernelLinear)
            part.weight_packed = joined.rows(start, start + w.shape[0])
            start += w.shape[0]
        return cls(joined)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight_packed.qtype.name}"


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`tensors` stacked by rows: a view where a loader already read them as consecutive rows
    of one tensor (`gguf_model.read_linears`), else a copy."""
    stacked = stacked_view(tensors)
    return torch.cat(tensors) if stacked is None else stacked


class RawBlockLinear(nn.Module):
    """GGUF blocks kept as stored; each call dequantizes this layer's weight, then `F.linear`."""

    def __init__(self, rows: torch.Tensor, qtype: GGMLQuantizationType,
                 shape: tuple[int, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.qtype = qtype
        self.register_buffer("blocks", rows.contiguous())  # [N, bytes per row]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.blocks.view(-1), self.qtype, (self.out_features,
                                                               self.in_features))
        return F.linear(x, weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype.name}, just in time"


class KQuantLinear(nn.Module):
    """A K-quant weight as the file stores it, [N, K / 256 * type_size] uint8, run by
    `kernels.kquant_linear` (which dequantizes and uses F.linear where no kernel is built)."""

    def __init__(self, rows: torch.Tensor, qtype: GGMLQuantizationType,
                 shape: tuple[int, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.qtype = qtype
        self.register_buffer("blocks", rows.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.kquant_linear(x, self.blocks, self.qtype)

    @classmethod
    def concat(cls, parts: Sequence[nn.Module]) -> KQuantLinear | None:
        """The parts stacked by output rows (`model.RowConcatenable`); they become views."""
        layers = [p for p in parts if isinstance(p, KQuantLinear)]
        if len(layers) != len(parts) or len({(p.qtype, p.in_features) for p in layers}) != 1:
            return None
        joined = _stack([p.blocks for p in layers])
        start = 0
        for part in layers:
            part.blocks = joined[start:start + part.out_features]
            start += part.out_features
        return cls(joined, layers[0].qtype, (start, layers[0].in_features))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype.name}"


class GGUFEmbedding(nn.Module):
    """Token embedding read from the file's memory map: only looked-up rows are dequantized.

    The rows stay in the read-only map (pages the OS loads on first touch), so the table costs
    no memory of its own. `weight` is a meta tensor with the table's shape and output dtype, for
    code that reads `embed_tokens.weight.dtype`; it holds no values.
    """

    def __init__(self, gguf_file: GGUFFile, name: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = gguf_file.tensor_shape(name)
        self.qtype = gguf_file.tensor_type(name)
        self.rows = gguf_file.raw(name).view(self.num_embeddings, -1)  # never written to
        self.weight = torch.empty(self.num_embeddings, self.embedding_dim, dtype=dtype,
                                  device="meta")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1).cpu()
        picked = self.rows.index_select(0, flat).view(-1)
        values = dequantize(picked, self.qtype, (flat.numel(), self.embedding_dim))
        return values.to(self.weight.dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype.name}, memory-mapped"


def block_linear(rows: torch.Tensor, qtype: GGMLQuantizationType,
                 shape: tuple[int, int]) -> nn.Module:
    """The module computing with GGUF blocks `rows` [N, bytes per row] of type `qtype`."""
    if qtype in kernels.SUPPORTED_TYPES:
        return BlockKernelLinear(kernels.repack(qtype, rows, shape))
    if qtype in kernels.KQUANT_TYPES:
        return KQuantLinear(rows, qtype, shape)
    return RawBlockLinear(rows, qtype, shape)


class CastEmbedding(nn.Module):
    """An embedding table kept as stored (e.g. bf16) whose rows come out in `dtype`.

    `weight` is a meta tensor with the table's shape and output dtype, for code that reads
    `embed_tokens.weight.dtype` (as `GGUFEmbedding`); the table is `table`.
    """

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("table", table)
        self.weight = torch.empty(table.shape, dtype=dtype, device="meta")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table).to(self.weight.dtype)


def kernel_summary(model: nn.Module) -> dict[str, str]:
    """What computes each weight type in `model`: {"Q4_K": "49 x k-quant kernel (avx2)", ...}."""
    isa = kernels.kernel_isa() or "not built: dequantize + F.linear"
    counts: Counter[tuple[str, str]] = Counter()
    for module in model.modules():
        if isinstance(module, BlockKernelLinear):
            counts[module.weight_packed.qtype.name, f"block kernel ({isa})"] += 1
        elif isinstance(module, KQuantLinear):
            counts[module.qtype.name, f"k-quant kernel ({isa})"] += 1
        elif isinstance(module, RawBlockLinear):
            counts[module.qtype.name, "dequantized per call (slow)"] += 1
        elif isinstance(module, Int4Linear):
            counts[f"{module.num_planes}-plane int4", f"Int4Linear ({module.kernel})"] += 1
        elif isinstance(module, nn.Linear):
            counts[str(module.weight.dtype).removeprefix("torch."), "F.linear"] += 1
    return {qtype: f"{count} x {kernel}" for (qtype, kernel), count in sorted(counts.items())}


def model_nbytes(model: nn.Module) -> int:
    """Bytes a model holds in memory: parameters, buffers and repacked GGUF blocks.

    Meta tensors (a `GGUFEmbedding`'s shape carrier) and the memory-mapped file count nothing.
    """
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    for module in model.modules():
        if isinstance(module, BlockKernelLinear):
            total += module.weight_packed.nbytes
    return total
