"""A GGUF file's header, validated: version, metadata values and the tensor table.

Every length and offset is checked against the file's size before it is used, so a
truncated or crafted file fails with a ModelFileError naming the file and the field.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from levante.errors import ModelFileError
from levante.quant.gguf_blocks import expected_nbytes

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
        """`count` length-prefixed UTF-8 strings (a hot loop: 49152 of them for a vocab).

        A loop without per-string checks reads a well-formed file (SmolLM2's vocab and merges
        in ~40 ms instead of ~55); anything it trips on, the checked loop reads again to say
        exactly where the file is wrong.
        """
        if count > (self.size - self.pos) // 8:
            raise self.truncated(f"{what} ({count} strings)", self.pos, 8 * count)
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        items: list[str] = []
        append = items.append
        try:
            for _ in range(count):
                (length,) = unpack(buf, pos)
                pos += 8
                append(buf[pos:pos + length].decode("utf-8"))
                pos += length
        except (struct.error, OverflowError, UnicodeDecodeError):
            pos = self.size + 1
        if pos <= self.size:
            self.pos = pos
            return items
        return self._checked_strings(count, what)

    def _checked_strings(self, count: int, what: str) -> list[str]:
        """`strings`, checking each string: the error names the first one that is wrong."""
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
class TensorInfo:
    """Where one tensor's bytes lie and how to read them."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    offset: int  # from the start of the data section
    start: int = 0  # from the start of the file
    nbytes: int = 0


def _read_tensor_info(cursor: _Cursor) -> TensorInfo:
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
    return TensorInfo(name, qtype, tuple(reversed(dims)), offset)


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    """`general.alignment` (default 32): a positive power of two."""
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"general.alignment must be a power of two, got {alignment!r}")
    return alignment


def _place_tensors(infos: list[TensorInfo], data_start: int, alignment: int,
                   cursor: _Cursor) -> dict[str, TensorInfo]:
    """Check each tensor's size, alignment and byte range; no overlaps; names unique."""
    placed: dict[str, TensorInfo] = {}
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
        placed[info.name] = TensorInfo(info.name, info.qtype, info.shape, info.offset,
                                        start, nbytes)
    by_start = sorted(placed.values(), key=lambda t: t.start)
    for before, after in itertools.pairwise(by_start):
        if after.start < before.start + before.nbytes:
            raise ModelFileError(cursor.path, f"tensor {after.name} overlaps tensor {before.name}")
    return placed


def parse_header(buf: mmap.mmap, path: Path) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
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
