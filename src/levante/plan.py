"""Memory planner: weight bytes per format, KV cache per token and context, overhead, the verdict.

Weights come from a real tensor list (a GGUF file's stored sizes, a safetensors checkpoint's
shapes) or a preset's shapes. GGUF formats cost what their blocks cost (bits per weight from
`gguf.GGML_QUANT_SIZES`: Q8_0 8.5, Q4_0 4.5, Q4_1 5.0, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625), and
the K-quant mixes (Q4_K_M, ...) pick a type per tensor the way llama.cpp's quantizer does, so
for Mistral Small 3 they land on the sizes of the published files (Q4_K_M 14.3 GB).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from levante.bundle import read_json_object
from levante.config import KV_BYTES_PER_VALUE, PRESETS, ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.quant.gguf_quantize import LLAMA_CPP_FALLBACK, SINGLE_TYPES, llama_cpp_type
from levante.weights.layout import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, expected_shapes, hf_name

# The engine's default KV storage: 16-bit, as GPU servers and llama.cpp keep it.
DEFAULT_KV_CACHE_DTYPE = "float16"
# Fitted to measurements (peak RSS of a fresh process whose prompt fills its context, less
# weights and KV, for SmolLM2 and the Mistral proxy): a process that has imported torch and
# Levante, kernels loaded, holds ~270 MB, ~285 with allocator slack. That baseline moves with
# how PyTorch's library pages count: 286 MiB in a fresh `make setup` venv, 231 MiB in a
# long-used one on the same 2-core AVX2 machine and the same packages (2026-12-04); 285 keeps
# both within 10% (SmolLM2 0.95-1.08). A prefill chunk keeps ~3 copies of a layer's widest
# activations alive, in the compute dtype; the tokenizer costs ~600 bytes a vocabulary entry
# (HF BPE less, Tekken with mistral-common more).
FIXED_OVERHEAD_BYTES = 285 * 2**20
ACTIVATION_COPIES = 3
TOKENIZER_BYTES_PER_TOKEN = 600
PREFILL_CHUNK_TOKENS = 512  # EngineConfig.max_num_batched_tokens' default

# The launch post's deployment table for Mistral Small 3, shown next to our numbers.
POST_ROWS = {"f16": ("FP16", 48e9), "q8_0": ("8-bit", 24e9), "q4_k_m": ("Q4_K_M", 12e9),
             "q3_k_m": ("3-bit", 9e9)}
FLOAT_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0}
K_MIXES = ("q5_k_m", "q4_k_m", "q3_k_m")
LEVANTE_FORMATS = ("int8", "int4", "fp8")  # levante.quant.linear / .fp8, computed in memory
FORMATS = (*FLOAT_BITS, *SINGLE_TYPES, *K_MIXES, *LEVANTE_FORMATS)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Bits one weight takes in a GGUF type: block bytes x 8 / values per block."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return type_size * 8 / block_size


def gguf_tensor_type(fmt: str, name: str, num_layers: int, row_size: int) -> GGMLQuantizationType:
    """`llama_cpp_type`, then llama.cpp's fallback where rows are not whole 256-value blocks."""
    chosen = llama_cpp_type(fmt, name, num_layers)
    if chosen in LLAMA_CPP_FALLBACK and row_size % 256:
        return LLAMA_CPP_FALLBACK[chosen]
    return chosen


def tensor_bytes(fmt: str, name: str, shape: tuple[int, ...], num_layers: int) -> int:
    """Bytes tensor `name` takes in format `fmt`; 1-D tensors (norms) stay float32 in GGUF."""
    count = math.prod(shape)
    if fmt in FLOAT_BITS:
        return count * int(FLOAT_BITS[fmt]) // 8
    if len(shape) == 1:
        return count * (2 if fmt in LEVANTE_FORMATS else 4)
    rows, cols = shape
    if name == "model.embed_tokens.weight" and fmt in LEVANTE_FORMATS:  # stays bf16
        return count * 2
    if fmt == "fp8":  # e4m3 codes + an f32 scale per row; the head stays bf16 (quant.fp8)
        return count * 2 if name == "lm_head.weight" else count + 4 * rows
    if fmt == "int8" or (fmt == "int4" and name == "lm_head.weight"):  # + an f32 scale per row
        return count + 4 * rows
    if fmt == "int4":  # nibbles + bf16 scale and zero per group of 32
        return count // 2 + rows * (cols // 32) * 4
    block_size, type_size = GGML_QUANT_SIZES[gguf_tensor_type(fmt, name, num_layers, cols)]
    return count // block_size * type_size


@dataclass(frozen=True)
class FormatRow:
    """Weights of the model in one format, with the launch post's figure where it gives one."""

    format: str
    weights_bytes: int
    bits_per_weight: float
    post_label: str | None = None
    post_bytes: float | None = None


@dataclass(frozen=True)
class Plan:
    """What running a model takes on one device, and whether it fits `memory`."""

    model: str
    source: str  # "preset" | "gguf" | "safetensors"
    quant: str
    context: int
    batch: int
    tensor_parallel: int
    memory: int | None
    num_params: int
    weights_bytes: int  # per device
    # of weights_bytes: an untied embedding read from the file's memory map, resident only as
    # tokens are looked up (a file run as stored); not counted in total_bytes
    mapped_bytes: int
    kv_bytes_per_token: int  # per device, one sequence
    kv_cache_bytes: int  # per device, context x batch
    overhead_bytes: int
    total_bytes: int
    fits: bool | None  # None when no memory was given
    max_context: int | None  # longest context (up to the model's) that fits; None: no memory
    model_max_context: int
    rows: tuple[FormatRow, ...]

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object (`levante plan --json`)."""
        return asdict(self)


@dataclass(frozen=True)
class _Weights:
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]  # HF names
    stored_bytes: int | None  # what the file holds as it is (None for presets)
    stored_format: str | None
    source: str
    embedding_bytes: int = 0  # the token embedding as stored


def plan(ref_or_preset: str, *, quant: str | None = None, context: int | None = None,
         batch: int = 1, memory: int | None = None, tensor_parallel: int = 1,
         kv_cache_dtype: str = DEFAULT_KV_CACHE_DTYPE) -> Plan:
    """Plan memory for a preset name or a model ref; `quant` None (or the stored format's
    name) means the file as stored.

    Per device: weights / tensor_parallel, KV heads split across devices (at least one each),
    overhead = FIXED_OVERHEAD_BYTES + one prefill chunk's activations + the batch's logits +
    the tokenizer. A file run as stored reads an untied embedding from its memory map
    (`mapped_bytes`): only looked-up rows become resident, so the total leaves it out.
    """
    weights = _weights(ref_or_preset)
    config = weights.config
    context = config.max_seq_len if context is None else context
    _check_args(quant, context, batch, memory, tensor_parallel, weights)
    if kv_cache_dtype not in KV_BYTES_PER_VALUE:
        raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_BYTES_PER_VALUE)}; "
                          f"got {kv_cache_dtype!r}")
    mapped = 0
    if quant in (None, weights.stored_format) and weights.stored_bytes is not None:
        fmt, total_weights = weights.stored_format or "stored", weights.stored_bytes
        if not config.tie_embeddings and tensor_parallel == 1:
            mapped = weights.embedding_bytes
    else:
        fmt = quant or "bf16"  # a preset without --quant: bf16, as checkpoints ship
        total_weights = _format_bytes(fmt, weights)
    weights_bytes = -(-total_weights // tensor_parallel)
    kv_heads = -(-config.num_kv_heads // tensor_parallel)
    kv_per_token = math.ceil(config.num_layers * kv_heads * config.head_dim * 2
                             * KV_BYTES_PER_VALUE[kv_cache_dtype])
    kv_cache = kv_per_token * context * batch
    # A float model computes in its own dtype; block and Levante formats in float32.
    activation_bytes = int(FLOAT_BITS.get(fmt, 32)) // 8
    overhead = overhead_bytes(config, batch, tensor_parallel, activation_bytes)
    total = weights_bytes - mapped + kv_cache + overhead
    fits = None if memory is None else total <= memory
    max_context = None
    if memory is not None:
        room = memory - (weights_bytes - mapped) - overhead
        max_context = max(0, min(config.max_seq_len, room // (kv_per_token * batch)))
    rows = tuple(_row(f, weights, ref_or_preset) for f in FORMATS)
    return Plan(ref_or_preset, weights.source, fmt, context, batch, tensor_parallel, memory,
                sum(math.prod(s) for s in weights.shapes.values()), weights_bytes, mapped,
                kv_per_token,
                kv_cache, overhead, total, fits, max_context, config.max_seq_len, rows)


def overhead_bytes(config: ModelConfig, batch: int, tensor_parallel: int = 1,
                   activation_bytes: int = 4) -> int:
    """Runtime allowance + activations of one prefill chunk (`activation_bytes` a value) +
    the batch's float32 logits + the tokenizer."""
    width = (config.dim * 2 + (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
             + 2 * config.ffn_dim) // tensor_parallel
    return (FIXED_OVERHEAD_BYTES
            + ACTIVATION_COPIES * PREFILL_CHUNK_TOKENS * width * activation_bytes
            + batch * config.vocab_size * 4 + TOKENIZER_BYTES_PER_TOKEN * config.vocab_size)


def _check_args(quant: str | None, context: int, batch: int, memory: int | None,
                tensor_parallel: int, weights: _Weights) -> None:
    if quant is not None and quant not in FORMATS:
        raise ConfigError(f"--quant must be one of {', '.join(FORMATS)}; got {quant!r}")
    for name, value in (("context", context), ("batch", batch),
                        ("tensor_parallel", tensor_parallel)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if memory is not None and memory <= 0:
        raise ConfigError(f"memory must be positive, got {memory}")
    if context > weights.config.max_seq_len:
        raise ConfigError(f"context {context} exceeds the model's {weights.config.max_seq_len}")


def _format_bytes(fmt: str, weights: _Weights) -> int:
    config = weights.config
    total = sum(tensor_bytes(fmt, name, shape, config.num_layers)
                for name, shape in weights.shapes.items())
    if fmt in ("int8", "int4") and config.tie_embeddings:  # quantize_model's int8 head copy
        total += tensor_bytes(fmt, "lm_head.weight", (config.vocab_size, config.dim),
                              config.num_layers)
    return total


def _row(fmt: str, weights: _Weights, ref: str) -> FormatRow:
    nbytes = _format_bytes(fmt, weights)
    num_params = sum(math.prod(s) for s in weights.shapes.values())
    post = POST_ROWS.get(fmt) if ref == "mistral-small-3" else None
    return FormatRow(fmt, nbytes, round(nbytes * 8 / num_params, 3),
                     post[0] if post else None, post[1] if post else None)


def _weights(ref: str) -> _Weights:
    if ref in PRESETS:
        config = PRESETS[ref]
        return _Weights(config, expected_shapes(config), None, None, "preset")
    from levante.weights.hub import resolve

    path = resolve(ref)
    if path.is_file():
        return _gguf_weights(path)
    return _safetensors_weights(path)


def _gguf_weights(path: Path) -> _Weights:
    from levante.weights.gguf import GGUFFile

    gguf_file = GGUFFile(path)
    has_output = "output.weight" in gguf_file.tensor_names
    try:
        config = ModelConfig.from_gguf(gguf_file.metadata, has_output_tensor=has_output)
    except ConfigError as e:
        raise ModelFileError(path, str(e)) from None
    shapes: dict[str, tuple[int, ...]] = {}
    stored = 0
    for name in gguf_file.tensor_names:
        ours = hf_name(name, layer_names=GGUF_LAYER_NAMES, global_names=GGUF_GLOBAL_NAMES,
                       layer_prefix="blk.")
        if ours is not None:
            shapes[ours] = gguf_file.tensor_shape(name)
            stored += gguf_file.nbytes(name)
    file_type = gguf_file.metadata.get("general.file_type")
    embedding = gguf_file.nbytes("token_embd.weight") \
        if "token_embd.weight" in gguf_file.tensor_names else 0
    file_format = _FILE_TYPES.get(file_type) if file_type is not None else None
    return _Weights(config, shapes, stored, file_format, "gguf", embedding)


# general.file_type (llama.cpp's LLAMA_FTYPE_*) -> our format name
_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 12: "q3_k_m", 15: "q4_k_m",
               17: "q5_k_m", 18: "q6_k", 32: "bf16"}


def _safetensors_weights(folder: Path) -> _Weights:
    from safetensors import safe_open

    from levante.weights.safetensors import consolidated_shards, hf_shards

    if (folder / "config.json").exists():
        config = ModelConfig.from_hf(read_json_object(folder / "config.json"))
        files = hf_shards(folder)
    elif (folder / "params.json").exists():
        config = ModelConfig.from_params(read_json_object(folder / "params.json"))
        files = consolidated_shards(folder)
    else:
        raise ModelFileError(folder, "folder has neither config.json nor params.json")
    stored, embedding, dtypes = 0, 0, set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensor = f.get_slice(name)
                dtypes.add(tensor.get_dtype())
                nbytes = math.prod(tensor.get_shape()) * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
                stored += nbytes
                if name in ("model.embed_tokens.weight", "tok_embeddings.weight"):
                    embedding = nbytes
    fmt = {"BF16": "bf16", "F16": "f16", "F32": "f32"}.get(dtypes.pop()) if len(dtypes) == 1 \
        else None
    return _Weights(config, expected_shapes(config), stored, fmt, "safetensors", embedding)


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F64": 8, "I32": 4, "I64": 8}


