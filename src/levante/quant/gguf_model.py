"""A Transformer on GGUF blocks: a GGUF file's as stored, or a float model's quantized at load.

`load_gguf_quantized` builds a model from a file's tensors, each as the module its type
computes with (levante.quant.gguf_linear); `quantize_model_gguf` swaps a float model's linears
for the GGUF types `levante quantize --to fmt` would write (`--quant q4_k_m` at load).
Bytes are read with plain file reads, not through the memory map, so a loaded model's resident
memory is what it holds, not that plus every page of the file it touched (the embedding is
the exception: it looks rows up in the map, touching only the pages of tokens it sees).
Every projection's type is checked before any weight is read: an unknown type, a tensor
whose byte size does not match its type and shape, or a truncated file is a ModelFileError
naming the file and the tensor.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import BinaryIO

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.load_config import GGUF_LOAD_FORMATS
from levante.model import RMSNorm, Transformer, rotary_table
from levante.quant import kernels
from levante.quant.checkpoint import model_skeleton
from levante.quant.gguf_blocks import FLOAT_DTYPES, K_SCALE_SIZE, SUPPORTED_TYPES, dequantize
from levante.quant.gguf_linear import (
    BlockKernelLinear,
    CastEmbedding,
    GGUFEmbedding,
    KQuantLinear,
    RawBlockLinear,
    block_linear,
    kernel_summary,
)
from levante.quant.gguf_quantize import encode, export_type
from levante.quant.linear import Int4Linear
from levante.weights.gguf import GGUFFile, check_fits_config, expected_gguf_shapes
from levante.weights.layout import interleaved_to_half

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
K_QUANT_BITS = {Q.Q4_K: 4, Q.Q5_K: 5}  # the Int4Linear route, where no K-quant kernel is built
# Bytes of rows read per step when repacking for the block kernel. Loads run inside
# heap.compact_heap, so such buffers leave no resident holes; 64 KiB steps cost SmolLM2's load
# ~0.05-0.1 s of per-chunk overhead (1673 repack calls), 1 MiB ones do not.
CHUNK_BYTES = 1 << 20


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start + 2) of each block as f16 widened to f32: [n_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, c, 32] bytes -> [n, 2c, 32] uint8: chunk j's low nibbles, then its high nibbles."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).flatten(1, 2)


def _scales_mins(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant's 12-byte table of eight 6-bit scales and mins -> 2 x uint8 [n, 8].

    Scales/mins 0-3: low 6 bits of bytes 0-3 / 4-7. Scales/mins 4-7: low/high nibble of
    bytes 8-11, plus the top 2 bits of bytes 0-3 / 4-7 as bits 4-5.
    Example: byte 0 = 0x45, byte 8 = 0x23 -> scale 0 = 0x05, scale 4 = 0x3 | (0x45 >> 6) << 4 = 19.
    """
    low, mid, high = table[:, 0:4], table[:, 4:8], table[:, 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=1)
    return scales, mins


def k_quant_codes(blocks: torch.Tensor, qtype: GGMLQuantizationType
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K super-blocks [n, type_size] -> (codes uint8 [n, 256], scales, offsets [n, 8]).

    Value = codes * scale + offset per 32-value sub-block, with scale = d * sc_j and
    offset = -(dmin * m_j): the same f32 products `gguf_blocks` forms, so equal bit for bit.
    Q4_K: 128 bytes of nibbles from byte 16 (32-byte chunk c: sub-blocks 2c, 2c + 1).
    Q5_K: the fifth bit of value l of sub-block j is bit j of qh[l] (bytes 16-47); nibbles
    follow from byte 48. Example: qh[0] = 0b10, nibble 0x7 in sub-block 1 -> code 0x17 = 23.
    """
    num_blocks = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mins = _scales_mins(blocks[:, 4:4 + K_SCALE_SIZE])
    start = 16 if qtype == Q.Q4_K else 48
    codes = _nibbles(blocks[:, start:start + 128].reshape(num_blocks, 4, 32))  # [n, 8, 32]
    if qtype == Q.Q5_K:
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        codes |= ((blocks[:, 16:48].unsqueeze(1) >> shifts) & 1) << 4
    return codes.view(num_blocks, QK_K), d * sc.float(), -(dmin * mins.float())


def _data_offset(gguf_file: GGUFFile, name: str) -> int:
    """Where tensor `name`'s bytes start in the file (`raw` is a view of the whole-file map)."""
    view = gguf_file.raw(name)
    file_size = gguf_file.path.stat().st_size
    if view.untyped_storage().nbytes() != file_size:  # the view must index the whole file
        raise ModelFileError(gguf_file.path, "cannot locate tensor data in the file map")
    return view.storage_offset()


def read_rows(handle: BinaryIO, gguf_file: GGUFFile, name: str, start: int = 0,
              count: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, start + count) of tensor `name` as uint8 [count, bytes per row].

    Into a new tensor, or into the front of the uint8 buffer `out` (the result is a view).
    """
    shape = gguf_file.tensor_shape(name)
    num_rows = math.prod(shape[:-1])
    row_bytes = gguf_file.nbytes(name) // num_rows
    count = num_rows - start if count is None else min(count, num_rows - start)
    buffer = torch.empty(count * row_bytes, dtype=torch.uint8) if out is None \
        else out[:count * row_bytes]
    handle.seek(_data_offset(gguf_file, name) + start * row_bytes)
    if handle.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise ModelFileError(gguf_file.path, f"tensor {name}: file ended early")
    return buffer.view(count, row_bytes)


def _read_float(handle: BinaryIO, gguf_file: GGUFFile, name: str,
                dtype: torch.dtype) -> torch.Tensor:
    """A small tensor (a norm) dequantized to `dtype`, read without touching the file map."""
    raw = read_rows(handle, gguf_file, name).view(-1)
    try:
        return dequantize(raw, gguf_file.tensor_type(name), gguf_file.tensor_shape(name)).to(dtype)
    except ValueError as e:
        raise ModelFileError(gguf_file.path, f"tensor {name}: {e}") from None


def _repack_in_chunks(gguf_file: GGUFFile, name: str, num_heads: int | None,
                      whole: kernels.PackedWeight, first_row: int = 0) -> None:
    """`kernels.repack` of tensor `name` into rows `first_row ..` of `whole`, CHUNK_BYTES of
    rows at a time.

    The rows are read in place from the file's memory map (copying them out first cost
    SmolLM2's cold load ~0.06 s of its ~0.2 s), and each chunk's file pages leave this
    process's RSS once repacked, so the load's peak stays near the model's own size. Chunks
    hold whole heads (q/k rows reorder chunk by chunk) and whole groups of the kernel's
    interleaved rows, so the chunks' arrays concatenate to the whole tensor's.
    """
    num_rows = gguf_file.tensor_shape(name)[0]
    row_bytes = gguf_file.nbytes(name) // num_rows
    step = max(1, CHUNK_BYTES // row_bytes)
    head_rows = num_rows // num_heads if num_heads is not None else 1
    unit = math.lcm(head_rows, kernels.PANEL_ROWS)  # whole heads, whole interleaved panels
    step = max(unit, step // unit * unit)
    mapped = gguf_file.raw(name).view(num_rows, row_bytes)  # read-only: never written
    for start in range(0, num_rows, step):
        rows = mapped[start:start + step]
        if num_heads is not None:
            rows = interleaved_to_half(rows, rows.shape[0] // head_rows)
        kernels.repack_into(whole, first_row + start, rows)
        gguf_file.drop_pages(name, start * row_bytes, rows.shape[0] * row_bytes)


@torch.no_grad()
def quantize_model_gguf(model: Transformer, fmt: str) -> Transformer:
    """Every linear of a float `model` quantized, in place, to the GGUF types `levante quantize
    --to fmt` (llama.cpp's quantizer) writes for it, then computed by the GGUF kernels in
    float32 activations, as a GGUF file of that format would be. One layer is quantized at a
    time (its float weight is freed, or stays only in the checkpoint's memory map); the
    embedding stays as stored and is widened per looked-up row, norms become float32.
    """
    if fmt not in GGUF_LOAD_FORMATS:
        raise ValueError(f"GGUF formats at load are {', '.join(GGUF_LOAD_FORMATS)}; got {fmt!r}")
    config = model.config
    counts: Counter[str] = Counter()
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        weight = module.weight.detach()
        shape = (weight.shape[0], weight.shape[1])
        qtype = export_type(fmt, f"{name}.weight", shape, config.num_layers,
                            is_tied=config.tie_embeddings and name == "lm_head")
        if qtype in FLOAT_DTYPES:
            new: nn.Module = nn.Linear(shape[1], shape[0], bias=False, device="meta")
            new.weight = nn.Parameter(weight.float(), requires_grad=False)
        else:
            rows = torch.from_numpy(encode(weight.float(), qtype)).view(shape[0], -1)
            new = block_linear(rows, qtype, shape)
        counts[qtype.name] += 1
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    embed = model.model.embed_tokens
    if isinstance(embed, nn.Embedding):
        model.model.embed_tokens = CastEmbedding(embed.weight.detach(), torch.float32)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=False)
    log.info("quantized at load to %s: %s", fmt,
             ", ".join(f"{count} x {qtype}" for qtype, count in sorted(counts.items())))
    return model


def read_linear(gguf_file: GGUFFile, name: str, handle: BinaryIO, *, dtype: torch.dtype,
                num_heads: int | None = None, kernel: str | None = None) -> nn.Module:
    """The module that computes with tensor `name` as stored (see the module docstring).

    `num_heads` (q/k projections) reorders whole rows from GGUF's interleaved rotary layout
    to rotate-half; block quantization runs along each row, so blocks move with their rows.
    """
    qtype = gguf_file.tensor_type(name)
    num_rows, num_cols = gguf_file.tensor_shape(name)
    try:
        if qtype in kernels.SUPPORTED_TYPES:
            whole = kernels.empty_packed(qtype, (num_rows, num_cols))
            _repack_in_chunks(gguf_file, name, num_heads, whole)
            return BlockKernelLinear(whole)
        rows = read_rows(handle, gguf_file, name)  # [N, bytes per row]
        if num_heads is not None:
            rows = interleaved_to_half(rows, num_heads)
        if qtype in kernels.KQUANT_TYPES:
            return KQuantLinear(rows, qtype, (num_rows, num_cols))
        if qtype in K_QUANT_BITS:
            codes, scales, offsets = k_quant_codes(rows.view(-1, GGML_QUANT_SIZES[qtype][1]),
                                                   qtype)
            return Int4Linear(codes.view(num_rows, num_cols), scales.view(num_rows, -1),
                              offsets.view(num_rows, -1), bits=K_QUANT_BITS[qtype],
                              kernel=kernel)
        if qtype in FLOAT_DTYPES:
            weight = dequantize(rows.view(-1), qtype, (num_rows, num_cols)).to(dtype)
            linear = nn.Linear(num_cols, num_rows, bias=False, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            return linear
        dequantize(rows[:1].reshape(-1), qtype, (1, num_cols))  # ValueError if unsupported
        return RawBlockLinear(rows, qtype, (num_rows, num_cols))
    except ValueError as e:
        raise ModelFileError(gguf_file.path, f"tensor {name}: {e}") from None


def read_linears(gguf_file: GGUFFile, names: Sequence[str], handle: BinaryIO, *,
                 dtype: torch.dtype, num_heads: Sequence[int | None],
                 kernel: str | None = None) -> list[nn.Module]:
    """`read_linear` of each of `names` (q/k/v, or gate/up), into one allocation where their
    kernel can later run them as one matmul: same type and width, and (block kernels) whole
    panels before the last. Their arrays are then consecutive rows of one tensor, and fusing
    them (`Transformer.fuse_projections`) is a view instead of a copy of most of the weights
    (SmolLM2: 0.03 s of a cold start; Mistral Small 3's Q4_K_M: ~7.5 GB of gate/up).
    """
    shapes = [gguf_file.tensor_shape(name) for name in names]
    qtypes = {gguf_file.tensor_type(name) for name in names}
    rows = [shape[0] for shape in shapes]
    qtype, width = gguf_file.tensor_type(names[0]), shapes[0][1]
    joinable = len(qtypes) == 1 and len({shape[1] for shape in shapes}) == 1
    starts = [sum(rows[:i]) for i in range(len(rows))]
    try:
        if joinable and qtype in kernels.SUPPORTED_TYPES \
                and all(n % kernels.PANEL_ROWS == 0 for n in rows[:-1]):
            whole = kernels.empty_packed(qtype, (sum(rows), width))
            for name, heads, start in zip(names, num_heads, starts):
                _repack_in_chunks(gguf_file, name, heads, whole, start)
            return [BlockKernelLinear(whole.rows(start, start + n))
                    for start, n in zip(starts, rows)]
        if joinable and qtype in kernels.KQUANT_TYPES:
            row_bytes = gguf_file.nbytes(names[0]) // rows[0]
            blocks = torch.empty(sum(rows), row_bytes, dtype=torch.uint8)
            for name, heads, start, n in zip(names, num_heads, starts, rows):
                part = read_rows(handle, gguf_file, name, out=blocks[start:start + n].view(-1))
                if heads is not None:
                    part.copy_(interleaved_to_half(part, heads))
            return [KQuantLinear(blocks[start:start + n], qtype, (n, width))
                    for start, n in zip(starts, rows)]
    except ValueError as e:
        raise ModelFileError(gguf_file.path, f"tensors {', '.join(names)}: {e}") from None
    return [read_linear(gguf_file, name, handle, dtype=dtype, num_heads=heads, kernel=kernel)
            for name, heads in zip(names, num_heads)]


# Our block and module names under model.layers[i] -> GGUF names after "blk.{i}.", in groups
# that fuse_projections joins (read into one allocation by `read_linears`).
_PROJECTION_GROUPS = (
    ("self_attn", {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}),
    ("self_attn", {"o_proj": "attn_output"}),
    ("mlp", {"gate_proj": "ffn_gate", "up_proj": "ffn_up"}),
    ("mlp", {"down_proj": "ffn_down"}),
)


def _check_shapes(gguf_file: GGUFFile, config: ModelConfig) -> None:
    """Every tensor the config needs is there, shaped as expected, in a type we compute with,
    and nothing else is (`check_fits_config`)."""
    check_fits_config(gguf_file, config)
    for name, shape in expected_gguf_shapes(config).items():
        if name not in gguf_file.tensor_names:
            raise ModelFileError(gguf_file.path, f"lacks tensor {name} the config needs")
        if gguf_file.tensor_shape(name) != shape:
            raise ModelFileError(gguf_file.path, f"tensor {name} has shape "
                                 f"{gguf_file.tensor_shape(name)}, expected {shape}")
        qtype = gguf_file.tensor_type(name)
        if qtype not in SUPPORTED_TYPES:
            known = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ModelFileError(gguf_file.path, f"tensor {name} has type {qtype.name}, which "
                                 f"Levante cannot compute with (supported: {known})")


def _norm(handle: BinaryIO, gguf_file: GGUFFile, name: str, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(_read_float(handle, gguf_file, name, dtype), requires_grad=False)


def load_gguf_quantized(gguf_file: GGUFFile, config: ModelConfig, dtype: torch.dtype, *,
                        kernel: str | None = None) -> Transformer:
    """A CPU Transformer computing with the file's quantized blocks, never the float model.

    Projections (`read_linears`) and the output head (`read_linear`, a tied one built from
    `token_embd`) compute with the blocks as stored, the embedding looks rows up in the memory
    map, norms are dequantized to `dtype`, which is also the dtype of activations between
    layers.
    """
    _check_shapes(gguf_file, config)
    model = model_skeleton(config)
    head = "token_embd.weight" if config.tie_embeddings else "output.weight"
    with open(gguf_file.path, "rb") as handle:
        # the head first: it is the largest tensor, so its read buffer meets the least memory
        model.lm_head = read_linear(gguf_file, head, handle, dtype=dtype, kernel=kernel)
        for index, layer in enumerate(model.model.layers):
            heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
            for block_name, group in _PROJECTION_GROUPS:
                block = layer.get_submodule(block_name)
                modules = read_linears(
                    gguf_file, [f"blk.{index}.{g}.weight" for g in group.values()], handle,
                    dtype=dtype, num_heads=[heads.get(g) for g in group.values()], kernel=kernel)
                for attr, module in zip(group, modules, strict=True):
                    setattr(block, attr, module)
            layer.input_layernorm.weight = _norm(handle, gguf_file,
                                                 f"blk.{index}.attn_norm.weight", dtype)
            layer.post_attention_layernorm.weight = _norm(
                handle, gguf_file, f"blk.{index}.ffn_norm.weight", dtype)
        model.model.norm.weight = _norm(handle, gguf_file, "output_norm.weight", dtype)
    gguf_file.drop_all_pages()  # what reading the weights from the map left mapped
    model.model.embed_tokens = GGUFEmbedding(gguf_file, "token_embd.weight", dtype)
    model.rope_cos, model.rope_sin = rotary_table(config, config.max_seq_len)
    summary = kernel_summary(model)
    log.info("%s: %s", gguf_file.path.name, "; ".join(f"{t}: {k}" for t, k in summary.items()))
    slow = [t for t, k in summary.items() if "slow" in k]
    if slow:
        log.warning("%s: no compiled kernel for %s: those weights are dequantized on every "
                    "call (slow)", gguf_file.path.name, ", ".join(slow))
    return model.eval()
