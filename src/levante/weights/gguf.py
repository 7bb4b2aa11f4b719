"""GGUF files: validated metadata, tokenizer fields and tensors, memory-mapped."""

from __future__ import annotations

import contextlib
import itertools
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.quant.gguf_blocks import dequantize, expected_nbytes
from levante.weights.layout import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    hf_name,
    interleaved_to_half,
)

# We parse the header ourselves rather than through `gguf.GGUFReader` (the type enums and
# block sizes still come from `gguf`; tests check our reading against the reader): the
# reader makes one numpy memmap view per array element, ~2 s for SmolLM2's 49152-token
# vocab, and a crafted array length makes it loop and allocate without bound.
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_SIZE = 24  # magic, u32 version, u64 tensor count, u64 key/value count
MAX_TENSORS = 1_000_000
MAX_KVS = 100_000
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...; real files use none

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32, GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: _U64, GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<?"),
}
_ARRAY_DTYPES: dict[int, np.dtype[Any]] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("?"),
}


class _Cursor:
    """Little-endian reads of GGUF header fields that never run past the end of the file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def truncated(self, what: str, start: int, num_bytes: int) -> ModelFileError:
        """The error for a field that does not fit in the file."""
        return ModelFileError(self.path, f"truncated or corrupt: {what} at byte {start} needs "
                                         f"{num_bytes} bytes but the file has {self.size}")

    def take(self, num_bytes: int, what: str) -> int:
        """Step over `num_bytes` bytes and return where they start."""
        start = self.pos
        if num_bytes > self.size - start:
            raise self.truncated(what, start, num_bytes)
        self.pos = start + num_bytes
        return start

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        """One fixed-size value."""
        return fmt.unpack_from(self.buf, self.take(fmt.size, what))[0]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` length-prefixed UTF-8 strings (a hot loop: 49152 of them for a vocab)."""
        if count > (self.size - self.pos) // 8:
            raise self.truncated(f"{what} ({count} strings)", self.pos, 8 * count)
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        items = []
        for _ in range(count):
            if pos + 8 > size:
                raise self.truncated(what, pos, 8)
            (length,) = unpack(buf, pos)
            pos += 8
            if length > size - pos:
                raise self.truncated(what, pos, length)
            try:
                items.append(buf[pos:pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise ModelFileError(self.path, f"{what}: invalid UTF-8 at byte {pos}") from None
            pos += length
        self.pos = pos
        return items


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32: 1e-05, not 9.99999974738e-06."""
    return float(str(np.float32(value)))


def _read_value(cursor: _Cursor, value_type: int, what: str, depth: int = 0) -> Any:
    """One metadata value as a plain Python value (lists for arrays)."""
    if value_type == GGUFValueType.STRING:
        return cursor.strings(1, what)[0]
    if value_type == GGUFValueType.FLOAT32:
        return _shortest_float32(cursor.scalar(_SCALARS[value_type], what))
    if value_type in _SCALARS:
        return cursor.scalar(_SCALARS[value_type], what)
    if value_type != GGUFValueType.ARRAY:
        raise ModelFileError(cursor.path, f"{what} has unknown value type {value_type}")
    item_type = cursor.scalar(_U32, what)
    count = cursor.scalar(_U64, what)
    if item_type == GGUFValueType.STRING:
        return cursor.strings(count, what)
    if item_type in _ARRAY_DTYPES:  # float32 arrays (token scores) are widened exactly
        dtype = _ARRAY_DTYPES[item_type]
        start = cursor.take(count * dtype.itemsize, what)
        return np.frombuffer(cursor.buf, dtype, count, start).tolist() if count else []
    if item_type != GGUFValueType.ARRAY or depth >= MAX_ARRAY_DEPTH:
        raise ModelFileError(cursor.path, f"{what} is an array of unsupported type {item_type}")
    if count > (cursor.size - cursor.pos) // 12:  # a nested array header is 12 bytes
        raise cursor.truncated(f"{what} ({count} arrays)", cursor.pos, 12 * count)
    return [_read_value(cursor, item_type, what, depth + 1) for _ in range(count)]


def _read_metadata(cursor: _Cursor, num_kvs: int) -> dict[str, Any]:
    """The key/value section: metadata keys to plain Python values."""
    metadata: dict[str, Any] = {}
    for _ in range(num_kvs):
        key = cursor.strings(1, "metadata key")[0]
        value_type = cursor.scalar(_U32, f"metadata {key!r}")
        if key in metadata:
            raise ModelFileError(cursor.path, f"metadata key {key!r} appears twice")
        metadata[key] = _read_value(cursor, value_type, f"metadata {key!r}")
    return metadata


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor's bytes lie and how to read them."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    offset: int  # from the start of the data section
    start: int = 0  # from the start of the file
    nbytes: int = 0


def _read_tensor_info(cursor: _Cursor) -> _TensorInfo:
    """One tensor-info record: name, dims (innermost first), type, data offset."""
    name = cursor.strings(1, "tensor name")[0]
    what = f"tensor {name}"
    num_dims = cursor.scalar(_U32, what)
    if not 1 <= num_dims <= MAX_DIMS:
        raise ModelFileError(cursor.path, f"{what} has {num_dims} dimensions (allowed: 1 to 4)")
    dims = struct.unpack_from(f"<{num_dims}Q", cursor.buf, cursor.take(8 * num_dims, what))
    if 0 in dims:
        raise ModelFileError(cursor.path, f"{what} has a zero dimension: {list(dims)}")
    raw_type = cursor.scalar(_U32, what)
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ModelFileError(cursor.path, f"{what} has unknown type {raw_type}") from None
    offset = cursor.scalar(_U64, what)
    return _TensorInfo(name, qtype, tuple(reversed(dims)), offset)


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    """`general.alignment` (default 32): a positive power of two."""
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"general.alignment must be a power of two, got {alignment!r}")
    return alignment


def _place_tensors(infos: list[_TensorInfo], data_start: int, alignment: int,
                   cursor: _Cursor) -> dict[str, _TensorInfo]:
    """Check each tensor's size, alignment and byte range; no overlaps; names unique."""
    placed: dict[str, _TensorInfo] = {}
    for info in infos:
        if info.name in placed:
            raise ModelFileError(cursor.path, f"tensor {info.name} appears twice")
        if info.offset % alignment:
            raise ModelFileError(cursor.path, f"tensor {info.name} starts at data offset "
                                              f"{info.offset}, not a multiple of {alignment}")
        try:
            nbytes = expected_nbytes(info.qtype, info.shape)
        except ValueError as e:
            raise ModelFileError(cursor.path, f"tensor {info.name}: {e}") from None
        start = data_start + info.offset
        if start + nbytes > cursor.size:
            raise ModelFileError(cursor.path, f"tensor {info.name} (bytes {start} to "
                                              f"{start + nbytes}) lies past the end of the file "
                                              f"({cursor.size} bytes): truncated or corrupt")
        placed[info.name] = _TensorInfo(info.name, info.qtype, info.shape, info.offset,
                                        start, nbytes)
    by_start = sorted(placed.values(), key=lambda t: t.start)
    for before, after in itertools.pairwise(by_start):
        if after.start < before.start + before.nbytes:
            raise ModelFileError(cursor.path, f"tensor {after.name} overlaps tensor {before.name}")
    return placed


def _parse(buf: mmap.mmap, path: Path) -> tuple[int, dict[str, Any], dict[str, _TensorInfo]]:
    """Validate and read a GGUF header: (version, metadata, tensors by name in file order)."""
    if buf[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file: starts with {buf[:4]!r}, not b'GGUF'")
    cursor = _Cursor(buf, path)
    cursor.pos = 4
    version = cursor.scalar(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        endian = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ModelFileError(path, f"GGUF version {version} is not supported{endian}; "
                                   f"supported: 2, 3")
    num_tensors = cursor.scalar(_U64, "tensor count")
    num_kvs = cursor.scalar(_U64, "key/value count")
    if num_tensors > MAX_TENSORS or num_kvs > MAX_KVS:
        raise ModelFileError(path, f"header claims {num_tensors} tensors and {num_kvs} metadata "
                                   f"keys (limits {MAX_TENSORS}, {MAX_KVS}): corrupt")
    metadata = _read_metadata(cursor, num_kvs)
    infos = [_read_tensor_info(cursor) for _ in range(num_tensors)]
    alignment = _alignment(metadata, path)
    data_start = -(-cursor.pos // alignment) * alignment
    return version, metadata, _place_tensors(infos, data_start, alignment, cursor)


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
        self.version, self.metadata, self._tensors = _parse(buf, self.path)
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

    def _info(self, name: str) -> _TensorInfo:
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
        """The tensor dequantized to a new tensor of `dtype`."""
        info = self._info(name)
        try:
            weight = dequantize(self.raw(name), info.qtype, info.shape)
        except ValueError as e:
            raise ModelFileError(self.path, f"tensor {name}: {e}") from None
        self._drop_pages(info)
        return weight.to(dtype)

    def _drop_pages(self, info: _TensorInfo) -> None:
        """Take a read tensor's file pages out of this process's RSS (they stay in the page
        cache): a dequantizing load would otherwise hold the whole file resident beside the
        weights it made from it, e.g. 14 GB beside a 24B model's 48 GB of bf16."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.start // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError):  # an advice, never a failure
            self._buf.madvise(mmap.MADV_DONTNEED, start, info.start + info.nbytes - start)


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
    return state
