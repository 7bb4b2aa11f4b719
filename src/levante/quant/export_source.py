"""Checkpoints as `levante quantize` reads them: float32 tensors or row ranges, by file reads.

A GGUF file, an HF folder or a consolidated (Mistral) folder, all under our (HF) tensor names
with rotate-half q/k rows. Bytes are read with `os.pread`, not through a memory map: the pages
of a map stay in the process's resident set once touched, so a map of a 47 GB checkpoint read
start to end ends as 47 GB of RSS; reads keep it to the rows in hand.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from levante.bundle import read_json_object
from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.weights.layout import (
    CONSOLIDATED_GLOBAL_NAMES,
    CONSOLIDATED_LAYER_NAMES,
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    half_to_interleaved,
    interleaved_to_half,
)

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
Rows = tuple[int, int] | None  # [start, stop) of the first dimension, or the whole tensor


@dataclass
class TensorSource:
    """A checkpoint: its config and `load(name, rows)` -> float32 (the rows, or all of it).

    q/k projections come whole (their rows are permuted between layouts).
    """

    path: Path
    kind: str  # "gguf" | "hf" | "consolidated"
    config: ModelConfig
    load: Callable[[str, Rows], torch.Tensor]
    shape: Callable[[str], tuple[int, ...]]  # as stored (torch order); ModelFileError if absent
    gguf_path: Path | None = None


@contextmanager
def open_source(path: Path) -> Iterator[TensorSource]:
    """`path` (a GGUF file, an HF or consolidated folder) opened for reading tensors."""
    with ExitStack() as stack:
        yield _gguf_source(path, stack) if path.is_file() else _safetensors_source(path, stack)


def reverse_names(global_names: dict[str, str], layer_names: dict[str, str],
                  prefix: str) -> Callable[[str], str]:
    """Our (HF) name -> the checkpoint's name.

    Example: "model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight" (GGUF tables).
    """
    globals_back = {ours: theirs for theirs, ours in global_names.items()}
    layers_back = {ours: theirs for theirs, ours in layer_names.items()}

    def convert(name: str) -> str:
        if name in globals_back:
            return globals_back[name]
        _, _, index, rest = name.split(".", 3)
        return f"{prefix}{index}.{layers_back[rest]}"

    return convert


def is_permuted(name: str) -> bool:
    """Whether the tensor's rows differ between rotate-half and interleaved layouts."""
    return name.endswith(("q_proj.weight", "k_proj.weight"))


def unpermuted(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Interleaved (GGUF, consolidated) q/k rows -> rotate-half; other tensors unchanged."""
    if name.endswith("q_proj.weight"):
        return interleaved_to_half(tensor, config.num_heads)
    if name.endswith("k_proj.weight"):
        return interleaved_to_half(tensor, config.num_kv_heads)
    return tensor


def permuted(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Rotate-half q/k rows -> interleaved (as GGUF stores them); other tensors unchanged."""
    if name.endswith("q_proj.weight"):
        return half_to_interleaved(tensor, config.num_heads)
    if name.endswith("k_proj.weight"):
        return half_to_interleaved(tensor, config.num_kv_heads)
    return tensor


def _read(handle: Any, path: Path, offset: int, num_bytes: int, what: str) -> bytearray:
    """`num_bytes` at `offset` of an open file, or ModelFileError naming `what`.

    Loops: Linux returns at most ~2 GiB per read.
    """
    buffer = bytearray(num_bytes)
    view, done = memoryview(buffer), 0
    while done < num_bytes:
        got = os.preadv(handle.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise ModelFileError(path, f"{what}: file ends before its {num_bytes} bytes at "
                                       f"{offset}")
        done += got
    return buffer


def _gguf_source(path: Path, stack: ExitStack) -> TensorSource:
    from levante.quant.gguf_blocks import dequantize
    from levante.weights.gguf import GGUFFile

    gguf_file = GGUFFile(path)
    handle = stack.enter_context(path.open("rb"))
    config = ModelConfig.from_gguf(gguf_file.metadata,
                                   has_output_tensor="output.weight" in gguf_file.tensor_names)
    to_gguf = reverse_names(GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, "blk.")

    def stored(name: str) -> str:
        return to_gguf("model.embed_tokens.weight" if name == "lm_head.weight"
                       and config.tie_embeddings else name)

    def load(name: str, rows: Rows = None) -> torch.Tensor:
        key = stored(name)
        shape = gguf_file.tensor_shape(key)
        # `raw` is a zero-copy view of the file's map: its storage offset is the file offset
        # (taking the view reads nothing; the bytes come by pread)
        offset = int(gguf_file.raw(key).storage_offset())
        row_bytes = gguf_file.nbytes(key) // shape[0]
        start, stop = rows or (0, shape[0])
        data = _read(handle, path, offset + start * row_bytes, (stop - start) * row_bytes, key)
        tensor = dequantize(torch.frombuffer(data, dtype=torch.uint8),
                            gguf_file.tensor_type(key), (stop - start, *shape[1:]))
        return unpermuted(config, name, tensor) if rows is None else tensor

    return TensorSource(path, "gguf", config, load,
                        lambda name: gguf_file.tensor_shape(stored(name)), gguf_path=path)


def _safetensors_source(folder: Path, stack: ExitStack) -> TensorSource:
    from levante.weights.safetensors import consolidated_shards, hf_shards

    consolidated = not (folder / "config.json").exists()
    if consolidated and not (folder / "params.json").exists():
        raise ModelFileError(folder, "folder has neither config.json nor params.json")
    config = (ModelConfig.from_params(read_json_object(folder / "params.json")) if consolidated
              else ModelConfig.from_hf(read_json_object(folder / "config.json")))
    files = consolidated_shards(folder) if consolidated else hf_shards(folder)
    where: dict[str, tuple[Any, Path, str, tuple[int, ...], int]] = {}
    for file in files:
        handle = stack.enter_context(file.open("rb"))
        for key, (dtype, shape, offset) in _safetensors_header(handle, file).items():
            where[key] = (handle, file, dtype, shape, offset)
    stored_name = (reverse_names(CONSOLIDATED_GLOBAL_NAMES, CONSOLIDATED_LAYER_NAMES, "layers.")
                   if consolidated else (lambda name: name))

    def stored(name: str) -> tuple[str, Any, Path, str, tuple[int, ...], int]:
        key = stored_name("model.embed_tokens.weight" if name == "lm_head.weight"
                          and config.tie_embeddings else name)
        if key not in where:
            raise ModelFileError(folder, f"missing tensor {key}")
        return (key, *where[key])

    def load(name: str, rows: Rows = None) -> torch.Tensor:
        key, handle, file, dtype, shape, offset = stored(name)
        if dtype not in SAFETENSORS_DTYPES or not shape:
            raise ModelFileError(file, f"{key}: {dtype} {list(shape)} is not a weight Levante "
                                       f"quantizes ({', '.join(SAFETENSORS_DTYPES)} arrays)")
        element_size = SAFETENSORS_DTYPES[dtype].itemsize
        row_bytes = math.prod(shape[1:]) * element_size
        start, stop = rows or (0, shape[0])
        data = _read(handle, file, offset + start * row_bytes, (stop - start) * row_bytes, key)
        tensor = torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[dtype]).float()
        tensor = tensor.view(stop - start, *shape[1:])
        return unpermuted(config, name, tensor) if consolidated and rows is None else tensor

    return TensorSource(folder, "consolidated" if consolidated else "hf", config, load,
                        lambda name: stored(name)[4])


def _safetensors_header(handle: Any, file: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, absolute byte offset), checked against the file's size.

    Layout: u64 little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (offsets relative to the end of the header), the data.
    """
    size = os.fstat(handle.fileno()).st_size
    (header_bytes,) = struct.unpack("<Q", _read(handle, file, 0, 8, "header length"))
    if header_bytes > min(MAX_HEADER_BYTES, size - 8):
        raise ModelFileError(file, f"safetensors header of {header_bytes} bytes does not fit")
    try:
        header = json.loads(_read(handle, file, 8, header_bytes, "header"))
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - header_bytes:
                raise ModelFileError(file, f"{name}: bytes [{begin}, {end}) lie outside the file")
            if dtype in SAFETENSORS_DTYPES and (
                    end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize):
                raise ModelFileError(file, f"{name}: {end - begin} bytes do not hold "
                                           f"{dtype} {list(shape)}")
            entries[name] = (dtype, shape, 8 + header_bytes + begin)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(file, f"malformed safetensors header ({e})") from None
    return entries
