"""Each rank reads only its shard of the weights, straight from the GGUF or safetensors file.

No rank ever holds the whole checkpoint: GGUF tensors are sliced as raw bytes of the memory
map before dequantizing, safetensors tensors through `safe_open(...).get_slice`.

GGUF slicing. A tensor of shape [rows, cols] (torch order) stores each row as cols / B blocks
of `type_size` bytes (B = 32 for Q4_0/Q4_1/Q8_0, 256 for K-quants, 1 for F32/F16/BF16), so
- a row slice (q/k/v, gate/up, vocabulary) is one contiguous byte range: zero-copy, and only
  those rows are dequantized;
- a column slice (o, down) takes blocks [start // B, ceil(stop / B)) of every row, dequantizes
  those, and trims the partial blocks at either end. Real models' slices are whole blocks
  (SmolLM2 at N = 3: 192 and 512 columns, Mistral Small 3 at N = 2..8: multiples of 512), so
  in practice nothing is trimmed.
q/k rows come un-permuted from GGUF's interleaved RoPE layout head by head
(`interleaved_to_half` with the slice's own head count): a slice holds whole heads, so each
head's rows stay together and the result equals slicing the un-permuted full weight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from gguf import GGML_QUANT_SIZES
from safetensors import SafetensorError, safe_open

from levante.bundle import Bundle, load_tokenizer, read_json_object
from levante.chat import ChatFormat, JinjaChatFormat
from levante.config import ModelConfig
from levante.distributed.parallel import ShardSlice, parallelize, shard_plan
from levante.errors import ConfigError, ModelFileError
from levante.kinds import WeightFormat
from levante.model import Transformer
from levante.quant.gguf_blocks import dequantize
from levante.tokenizer import HFTokenizer, Tokenizer
from levante.weights.gguf import GGUFFile, expected_gguf_shapes
from levante.weights.layout import (
    CONSOLIDATED_GLOBAL_NAMES,
    CONSOLIDATED_LAYER_NAMES,
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    expected_shapes,
    interleaved_to_half,
)
from levante.weights.safetensors import consolidated_shards, hf_shards

log = logging.getLogger(__name__)


class ShardReader(Protocol):
    """Reads one tensor (HF name) or a slice of it, already in the model's layout."""

    def read(self, name: str, part: ShardSlice | None, dtype: torch.dtype) -> torch.Tensor:
        """The tensor's rows/columns `part` (all of it if None) as a new `dtype` tensor."""
        ...


def _file_name(name: str, layer_names: dict[str, str], global_names: dict[str, str],
               layer_prefix: str) -> str:
    """Our HF name -> the file's name (inverse of `layout.hf_name`)."""
    for theirs, ours in global_names.items():
        if ours == name:
            return theirs
    _, _, index, rest = name.split(".", 3)
    theirs = next(k for k, v in layer_names.items() if v == rest)
    return f"{layer_prefix}{index}.{theirs}"


def _heads_to_unpermute(name: str, part: ShardSlice | None, config: ModelConfig) -> int | None:
    """Heads in a q/k slice of a file stored in interleaved RoPE layout; None for others."""
    if not name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        return None
    full = config.num_heads if "q_proj" in name else config.num_kv_heads
    return full if part is None else (part.stop - part.start) // config.head_dim


class GGUFShardReader:
    """Slices of a GGUF file's tensors, dequantized from the bytes they cover only."""

    def __init__(self, gguf_file: GGUFFile, config: ModelConfig) -> None:
        self.file = gguf_file
        self.config = config
        self.shapes = expected_gguf_shapes(config)

    def read(self, name: str, part: ShardSlice | None, dtype: torch.dtype) -> torch.Tensor:
        """See `ShardReader.read`."""
        file_name = _file_name(name, GGUF_LAYER_NAMES, GGUF_GLOBAL_NAMES, "blk.")
        shape = self.file.tensor_shape(file_name)
        if shape != self.shapes[file_name]:
            raise ModelFileError(self.file.path, f"tensor {file_name} has shape {shape}, "
                                 f"expected {self.shapes[file_name]} from the config")
        try:
            weight = self._dequantize_part(file_name, shape, part)
        except ValueError as e:
            raise ModelFileError(self.file.path, f"tensor {file_name}: {e}") from None
        heads = _heads_to_unpermute(name, part, self.config)
        if heads is not None:
            weight = interleaved_to_half(weight, heads)
        return weight.to(dtype)

    def _dequantize_part(self, file_name: str, shape: tuple[int, ...],
                         part: ShardSlice | None) -> torch.Tensor:
        qtype = self.file.tensor_type(file_name)
        raw = self.file.raw(file_name)
        if part is None:
            return dequantize(raw, qtype, shape)
        rows, cols = shape
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        blocks = raw.view(rows, cols // block_size, type_size)  # [rows, blocks, bytes]
        if part.dim == 0:  # whole rows: one contiguous byte range, no copy
            picked = blocks[part.start:part.stop]
            return dequantize(picked.reshape(-1), qtype, (part.stop - part.start, cols))
        first, last = part.start // block_size, -(-part.stop // block_size)
        picked = blocks[:, first:last].contiguous()  # copies just these blocks
        weight = dequantize(picked.view(-1), qtype, (rows, (last - first) * block_size))
        offset = first * block_size
        return weight[:, part.start - offset:part.stop - offset].contiguous()


class SafetensorsShardReader:
    """Slices of safetensors tensors (HF or consolidated names) via `get_slice`."""

    def __init__(self, files: list[Path], config: ModelConfig, *, consolidated: bool) -> None:
        self.config = config
        self.consolidated = consolidated
        self.shapes = expected_shapes(config)
        self._handles: dict[str, Any] = {}  # tensor name in the file -> open safe_open handle
        for path in files:
            if not path.exists():
                raise ModelFileError(path, "shard listed in the index is missing")
            try:
                handle = safe_open(path, framework="pt")
            except SafetensorError as e:
                raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
            self._handles.update(dict.fromkeys(handle.keys(), (path, handle)))

    def read(self, name: str, part: ShardSlice | None, dtype: torch.dtype) -> torch.Tensor:
        """See `ShardReader.read`."""
        file_name = _file_name(name, CONSOLIDATED_LAYER_NAMES, CONSOLIDATED_GLOBAL_NAMES,
                               "layers.") if self.consolidated else name
        if file_name not in self._handles:
            raise ModelFileError(next(iter(self._handles.values()))[0] if self._handles else "",
                                 f"missing tensor {file_name}")
        path, handle = self._handles[file_name]
        view = handle.get_slice(file_name)
        shape = tuple(view.get_shape())
        if shape != self.shapes[name]:
            raise ModelFileError(path, f"tensor {file_name} has shape {shape}, expected "
                                 f"{self.shapes[name]} from the config")
        if view.get_dtype() not in ("F32", "F16", "BF16", "F64"):
            raise ModelFileError(path, f"tensor {file_name} has dtype {view.get_dtype()}, "
                                 f"expected a float")
        if part is None:
            weight = view[:]
        elif part.dim == 0:
            weight = view[part.start:part.stop]
        else:
            weight = view[:, part.start:part.stop]
        heads = _heads_to_unpermute(name, part, self.config) if self.consolidated else None
        if heads is not None:
            weight = interleaved_to_half(weight, heads)
        return weight.to(dtype)


def read_model_config(path: Path, *, max_seq_len: int | None = None) -> tuple[str, ModelConfig]:
    """The checkpoint's format ("gguf", "safetensors-hf", "safetensors-consolidated") and config.

    Mirrors `levante.bundle.load`'s detection without reading any weight.
    """
    if path.is_file():
        fmt, config = "gguf", _gguf_config(GGUFFile(path))
    elif (path / "config.json").exists():
        hf = read_json_object(path / "config.json")
        if "auto_map" in hf:
            raise ModelFileError(path / "config.json", "declares auto_map (remote code); "
                                 "Levante never runs code shipped with a model")
        fmt, config = "safetensors-hf", _parse(path / "config.json", ModelConfig.from_hf, hf)
    elif (path / "params.json").exists():
        fmt = "safetensors-consolidated"
        config = _parse(path / "params.json", ModelConfig.from_params,
                        read_json_object(path / "params.json"))
    else:
        raise ModelFileError(path, "folder has neither config.json nor params.json")
    if max_seq_len is not None:
        if max_seq_len > config.max_seq_len:
            raise ConfigError(f"max_model_len {max_seq_len} exceeds the model's context "
                              f"{config.max_seq_len}")
        config = config.replace(max_seq_len=max_seq_len)
    return fmt, config


def _gguf_config(gguf_file: GGUFFile) -> ModelConfig:
    try:
        return ModelConfig.from_gguf(gguf_file.metadata,
                                     has_output_tensor="output.weight" in gguf_file.tensor_names)
    except ConfigError as e:
        raise ModelFileError(gguf_file.path, str(e)) from None


def _parse(path: Path, build: Any, data: dict[str, Any]) -> ModelConfig:
    try:
        return build(data)
    except ConfigError as e:
        raise ModelFileError(path, str(e)) from None


def shard_reader(path: Path, fmt: str, config: ModelConfig) -> ShardReader:
    """The reader for a checkpoint in `fmt` (see `read_model_config`)."""
    if fmt == "gguf":
        return GGUFShardReader(GGUFFile(path), config)
    if fmt == "safetensors-hf":
        return SafetensorsShardReader(hf_shards(path), config, consolidated=False)
    return SafetensorsShardReader(consolidated_shards(path), config, consolidated=True)


def load_shard(reader: ShardReader, config: ModelConfig, *, rank: int, world_size: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's tensors (HF names), each only the slice `shard_plan` gives it."""
    return {name: reader.read(name, part, dtype)
            for name, part in shard_plan(config, rank, world_size).items()}


def load_parallel_model(path: Path, *, rank: int, world_size: int, dtype: torch.dtype,
                        device: str | torch.device = "cpu", max_seq_len: int | None = None,
                        ) -> Transformer:
    """This rank's sharded Transformer, read straight from the checkpoint at `path`.

    Needs the default process group initialized (the model's layers all-reduce over it).
    """
    fmt, config = read_model_config(path, max_seq_len=max_seq_len)
    reader = shard_reader(path, fmt, config)
    shards = load_shard(reader, config, rank=rank, world_size=world_size, dtype=dtype)
    log.info("rank %d/%d: loaded its shard of %s (%s)", rank, world_size, path, fmt)
    return parallelize(config, shards, rank=rank, world_size=world_size, device=device)


def sharded_bundle(ref: str, path: Path, model: Transformer) -> Bundle:
    """The Bundle rank 0 serves: its sharded model, the full config, tokenizer, chat format."""
    fmt, config = read_model_config(path, max_seq_len=model.config.max_seq_len)
    if fmt == "gguf":
        meta = GGUFFile(path).metadata
        tokenizer: Tokenizer = HFTokenizer.from_gguf_metadata(meta)
        chat: ChatFormat | None = JinjaChatFormat.from_gguf_metadata(meta, tokenizer) \
            if meta.get("tokenizer.chat_template") else None
    else:
        tokenizer, chat = load_tokenizer(path)
    return Bundle(ref, path, WeightFormat(fmt), config, model, tokenizer, chat)
