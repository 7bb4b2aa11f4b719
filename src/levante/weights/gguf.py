"""GGUF files: validated metadata, tokenizer fields and tensors, memory-mapped."""

from __future__ import annotations

import contextlib
import mmap
import warnings
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.quant.gguf_blocks import dequantize
from levante.weights.gguf_header import HEADER_SIZE, TensorInfo, parse_header
from levante.weights.layout import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    hf_name,
    interleaved_to_half,
)

LOAD_CHUNK_BYTES = 16 << 20  # float32 bytes `GGUFFile.load` dequantizes at a time


def _map(path: Path) -> mmap.mmap:
    """Memory-map a file read-only, after checking it can hold a GGUF header."""
    if not path.is_file():
        raise ModelFileError(path, "no such file")
    try:
        size = path.stat().st_size
        if size < HEADER_SIZE:
            raise ModelFileError(path, f"{size} bytes is too small for a GGUF header "
                                       f"({HEADER_SIZE} bytes)")
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from None


class GGUFFile:
    """A validated, memory-mapped GGUF file: metadata, tensor types/shapes, raw bytes.

    `metadata` maps every key to a plain Python value (str, int, float, bool or a list);
    `tensor_names` lists the tensors in file order. Any defect raises ModelFileError.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        buf = _map(self.path)
        self.version: int
        self.metadata: dict[str, Any]
        self.version, self.metadata, self._tensors = parse_header(buf, self.path)
        self._buf = buf
        architecture = self.metadata.get("general.architecture")
        if not isinstance(architecture, str):
            raise ModelFileError(self.path, "metadata lacks general.architecture")
        self.architecture: str = architecture
        self.tensor_names: list[str] = list(self._tensors)
        with warnings.catch_warnings():
            # Read-only on purpose: a private writable map of a many-GB file counts against
            # overcommit. `raw` documents that its views must not be written to.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._bytes = torch.frombuffer(buf, dtype=torch.uint8)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"no tensor named {name!r}") from None

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        """The tensor's GGML storage type (F32, Q4_K, ...)."""
        return self._info(name).qtype

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in torch order (GGUF lists dims innermost first)."""
        return self._info(name).shape

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes in the file."""
        return self._info(name).nbytes

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes: a 1-D uint8 zero-copy view of the read-only map (never write)."""
        info = self._info(name)
        return self._bytes[info.start:info.start + info.nbytes]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to a new tensor of `dtype`.

        Rows are dequantized LOAD_CHUNK_BYTES of float32 at a time into the result: a whole
        tensor's float32 copy (and its dequantizer's temporaries) would add several times the
        result to the load's peak, e.g. ~1 GB for the Mistral proxy's 131072 x 1280 output
        matrix loaded as bf16, ~4 GB for Mistral Small 3's.
        """
        info = self._info(name)
        out = torch.empty(info.shape, dtype=dtype)
        rows = out.view(-1, info.shape[-1]) if info.shape else out.view(1, 1)
        row_bytes = info.nbytes // rows.shape[0]
        step = max(1, LOAD_CHUNK_BYTES // (4 * rows.shape[1]))
        raw = self.raw(name)
        try:
            for start in range(0, rows.shape[0], step):
                part = rows[start:start + step]
                first, count = start * row_bytes, part.shape[0] * row_bytes
                part.copy_(dequantize(raw[first:first + count], info.qtype, tuple(part.shape)))
                self.drop_pages(name, first, count)
        except ValueError as e:
            raise ModelFileError(self.path, f"tensor {name}: {e}") from None
        return out

    def drop_pages(self, name: str, offset: int = 0, length: int | None = None) -> None:
        """Take bytes [offset, offset + length) of a read tensor (all of it by default) out
        of this process's RSS; the file's pages stay in the page cache. A load that converts
        what it reads from the map would otherwise hold the whole file resident beside what it
        made from it, e.g. 14 GB beside a 24B model's 48 GB of bf16."""
        info = self._info(name)
        end = info.start + (info.nbytes if length is None else min(info.nbytes, offset + length))
        self._drop(info.start + offset, end)

    def drop_all_pages(self) -> None:
        """Take every page of the file out of this process's RSS, for after a load: reading a
        tensor's rows maps its neighbours' pages too (the kernel's fault-around maps a whole
        aligned window, behind a chunk already dropped as well as ahead), ~3% of the weights'
        bytes measured on the Mistral-shaped proxy's Q8_0 file."""
        self._drop(0, len(self._buf))

    def _drop(self, first: int, end: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = first // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError):  # an advice, never a failure
            self._buf.madvise(mmap.MADV_DONTNEED, start, end - start)


def expected_gguf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> the torch-order shape `config` implies, for every tensor it needs."""
    dim, q_rows = config.dim, config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    per_layer = {
        "attn_norm.weight": (dim,), "attn_q.weight": (q_rows, dim),
        "attn_k.weight": (kv_rows, dim), "attn_v.weight": (kv_rows, dim),
        "attn_output.weight": (dim, q_rows), "ffn_norm.weight": (dim,),
        "ffn_gate.weight": (config.ffn_dim, dim), "ffn_up.weight": (config.ffn_dim, dim),
        "ffn_down.weight": (dim, config.ffn_dim),
    }
    assert per_layer.keys() == GGUF_LAYER_NAMES.keys()
    shapes = {"token_embd.weight": (config.vocab_size, dim), "output_norm.weight": (dim,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, dim)
    for layer in range(config.num_layers):
        shapes.update({f"blk.{layer}.{suffix}": shape for suffix, shape in per_layer.items()})
    return shapes


def _our_name(name: str) -> str | None:
    return hf_name(name, layer_names=GGUF_LAYER_NAMES, global_names=GGUF_GLOBAL_NAMES,
                   layer_prefix="blk.")


def check_fits_config(gguf_file: GGUFFile, config: ModelConfig) -> None:
    """Every tensor the config needs is present with its shape, and nothing else is there.

    A tensor Levante would not compute with (a bias, `rope_freqs.weight`'s RoPE factors, a
    layer beyond the config, any unknown name) is refused rather than dropped: a model that
    ships it computes with it. Reads only the header.
    """
    expected = expected_gguf_shapes(config)
    present = set(gguf_file.tensor_names)
    missing = [name for name in expected if name not in present]
    if missing:
        more = ", ..." if len(missing) > 5 else ""
        raise ModelFileError(gguf_file.path, f"lacks {len(missing)} tensor(s) the config needs: "
                                             f"{', '.join(missing[:5])}{more}")
    for name in gguf_file.tensor_names:
        if name not in expected:
            raise ModelFileError(gguf_file.path, _unexpected_tensor(name, config))
        shape = gguf_file.tensor_shape(name)
        if shape != expected[name]:
            raise ModelFileError(gguf_file.path, f"tensor {name} has shape {shape}, expected "
                                                 f"{expected[name]} from the config")


def _unexpected_tensor(name: str, config: ModelConfig) -> str:
    """Why a tensor the config does not call for is refused."""
    if name == "rope_freqs.weight":
        return (f"tensor {name} holds per-frequency RoPE factors (Llama 3.1-style RoPE "
                f"scaling), which are not implemented in Levante")
    if name.endswith(".bias"):
        return (f"tensor {name} is a bias: projection biases are not implemented in Levante")
    if _our_name(name) is not None:
        return (f"tensor {name} is not part of the model the config describes "
                f"({config.num_layers} layers, tie_embeddings={config.tie_embeddings})")
    return (f"tensor {name} is not one Levante knows for a llama/mistral model: it would not "
            f"compute with it")


def load_gguf_state_dict(gguf_file: GGUFFile, config: ModelConfig,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our HF-named state dict from a GGUF file, checked against `config`.

    q/k rows come back in rotate-half order (GGUF stores them interleaved, see
    `layout.interleaved_to_half`). A tied model has no `lm_head.weight`.
    """
    check_fits_config(gguf_file, config)
    expected = expected_gguf_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name in expected:
        weight = gguf_file.load(name, dtype)
        if name.endswith(".attn_q.weight"):
            weight = interleaved_to_half(weight, config.num_heads)
        elif name.endswith(".attn_k.weight"):
            weight = interleaved_to_half(weight, config.num_kv_heads)
        our_name = _our_name(name)
        assert our_name is not None, name
        state[our_name] = weight
    gguf_file.drop_all_pages()  # what reading the tensors from the map left mapped
    return state
