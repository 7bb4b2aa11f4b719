"""`levante quantize`: a checkpoint -> a GGUF file, or Levante's int8/int4 safetensors folder.

GGUF output is streamed tensor by tensor through `gguf.GGUFWriter`, each tensor in the type
and bytes llama.cpp's quantizer would give it (levante.quant.gguf_quantize: the K-quant mixes
pick a type per tensor), with llama.cpp's `general.file_type`.

Levante's int8/int4 safetensors folder: config.json, the tokenizer files, and a
model.safetensors in the format `levante.quant.checkpoint.quantized_tensors` documents.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter
from rich.progress import Progress
from safetensors.torch import save_file

from levante.config import ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.quant.checkpoint import QUANT_FORMAT_VERSION, QUANT_METADATA_KEY, quantized_tensors
from levante.quant.export_source import (
    TensorSource,
    is_permuted,
    open_source,
    permuted,
    reverse_names,
)
from levante.quant.gguf_quantize import GGUF_FORMATS, encode, export_type, llama_cpp_choice
from levante.weights.layout import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    expected_shapes,
)

log = logging.getLogger(__name__)
Q = GGMLQuantizationType

SAFETENSORS_FORMATS = ("int8", "int4")
FORMATS = (*GGUF_FORMATS, *SAFETENSORS_FORMATS)
CHUNK_VALUES = 2**24  # values read, widened to float32 and encoded at a time (64 MB)
TOKENIZER_FILES = ("tekken.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_checkpoint` wrote."""

    path: Path
    format: str
    num_tensors: int
    num_bytes: int
    tensor_types: dict[str, int]  # storage type -> how many tensors
    seconds: float


def quantize_checkpoint(src: str | Path, *, to: str, out: str | Path,
                        progress: bool = True) -> QuantizeResult:
    """Read `src` (a GGUF file, an HF or consolidated folder, a model ref); write `to` at `out`."""
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}; got {to!r}")
    from levante.weights.hub import resolve

    start = time.perf_counter()
    out = Path(out)
    with open_source(resolve(str(src))) as source:
        _check_shapes(source)
        if to in GGUF_FORMATS:
            types = _write_gguf(source, to, out, progress)
        else:
            types = _write_levante(source, to, out, progress)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir()))
    return QuantizeResult(out, to, sum(types.values()), size, types,
                          time.perf_counter() - start)


def _check_shapes(source: TensorSource) -> None:
    """Every tensor the config implies, with its shape: rows are read by byte offset."""
    for name, shape in expected_shapes(source.config).items():
        if source.shape(name) != shape:
            raise ModelFileError(source.path, f"{name} has shape {list(source.shape(name))}, "
                                              f"the config says {list(shape)}")


def _encode_tensor(source: TensorSource, name: str, shape: tuple[int, ...], qtype: Q,
                   advance: Callable[[int], None]) -> np.ndarray:
    """The tensor's stored form, encoded CHUNK_VALUES at a time from rows read in turn.

    Only the output (<= the tensor's size in `qtype`) and one chunk are in memory at once;
    q/k projections come whole, their rows permuted to GGUF's interleaved layout.
    """
    config = source.config
    step = shape[0] if is_permuted(name) or len(shape) == 1 else max(1, CHUNK_VALUES // shape[-1])
    out: np.ndarray | None = None
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        rows = None if step == shape[0] else (start, stop)
        tensor = permuted(config, name, source.load(name, rows))
        try:
            encoded = encode(tensor, qtype)
        except ValueError as e:
            raise ModelFileError(source.path, f"{name} -> {qtype.name}: {e}") from None
        if out is None:
            out = np.empty((shape[0], *encoded.shape[1:]), encoded.dtype)
        out[start:stop] = encoded
        advance(tensor.numel())
    assert out is not None
    return out


def _tensor_info(fmt: str, name: str, shape: tuple[int, ...],
                 config: ModelConfig) -> tuple[Q, tuple[int, ...], np.dtype[Any], int]:
    """(type, shape as GGUFWriter wants it, numpy dtype, bytes) for one tensor."""
    qtype = export_type(fmt, name, shape, config.num_layers, is_tied=config.tie_embeddings)
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return qtype, shape, dtype, int(np.prod(shape)) * dtype.itemsize
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
    return qtype, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _write_gguf(source: TensorSource, fmt: str, out: Path, progress: bool) -> dict[str, int]:
    """Header, metadata and tensor table first, then each tensor as it is loaded and encoded.

    A tensor that cannot be encoded (non-finite values, scales out of f16 range) fails with
    its name; the file is written as OUT.partial and renamed when complete.
    """
    config = source.config
    to_gguf = reverse_names(GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, "blk.")
    shapes = expected_shapes(config)
    infos = {name: _tensor_info(fmt, name, shape, config) for name, shape in shapes.items()}
    _log_fallbacks(fmt, shapes, infos, config)
    partial = out.with_name(out.name + ".partial")  # `out` appears only when complete
    writer = GGUFWriter(partial, arch="llama")
    try:
        _add_model_metadata(writer, config, fmt, source.path.name)
        _add_tokenizer(writer, source)
        for name, (qtype, shape, dtype, nbytes) in infos.items():
            raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
            writer.add_tensor_info(to_gguf(name), shape, dtype, nbytes, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(np.prod(shape)) for shape in shapes.values())
        with _progress(progress, f"quantizing to {fmt}", total) as advance:
            for name, (qtype, _, _, _) in infos.items():
                writer.write_tensor_data(_encode_tensor(source, name, shapes[name], qtype,
                                                        advance))
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    partial.replace(out)
    return _count(qtype.name for qtype, *_ in infos.values())


def _log_fallbacks(fmt: str, shapes: dict[str, tuple[int, ...]],
                   infos: dict[str, tuple[Q, tuple[int, ...], np.dtype[Any], int]],
                   config: ModelConfig) -> None:
    """One warning per (chosen, written) pair where rows are not whole blocks of the choice."""
    pairs = _count(f"{chosen.name} -> {infos[name][0].name}" for name, shape in shapes.items()
                   if (chosen := llama_cpp_choice(fmt, name, shape, config.num_layers,
                                                  config.tie_embeddings)) != infos[name][0])
    for pair, count in sorted(pairs.items()):
        log.warning("%d tensors have rows that are not whole blocks: %s", count, pair)


def _add_model_metadata(writer: GGUFWriter, config: ModelConfig, fmt: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(GGUF_FORMATS[fmt][1])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _add_tokenizer(writer: GGUFWriter, source: TensorSource) -> None:
    """Tokenizer metadata: copied from a GGUF source, else converted as llama.cpp's script does."""
    if source.gguf_path is not None:
        _copy_gguf_tokenizer(writer, source.gguf_path)
        return
    if (source.path / "tekken.json").exists():
        _add_tekken(writer, source.path)
    elif (source.path / "tokenizer.json").exists():
        _add_bpe(writer, source.path)
    else:
        raise ModelFileError(source.path, "no tokenizer (tekken.json or tokenizer.json) to "
                                          "write into the GGUF")


def _copy_gguf_tokenizer(writer: GGUFWriter, path: Path) -> None:
    """The tokenizer.* keys of a GGUF, typed as llama.cpp writes them.

    From `GGUFFile.metadata` (plain values): gguf-py's GGUFReader would give the stored types
    but makes a numpy view per vocabulary entry (+700 MB of RSS for a 131072-token vocab).
    Ids and flags are u32 / bool, scores f32, token types i32, tokens and merges strings.
    """
    from gguf import GGUFValueType

    from levante.weights.gguf import GGUFFile

    def value_type(value: Any, key: str) -> GGUFValueType:
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            return GGUFValueType.INT32
        for python_type, gguf_type in ((bool, GGUFValueType.BOOL), (int, GGUFValueType.UINT32),
                                       (float, GGUFValueType.FLOAT32),
                                       (str, GGUFValueType.STRING)):
            if isinstance(value, python_type):
                return gguf_type
        raise ModelFileError(path, f"{key}: cannot copy a value of type {type(value).__name__}")

    for key, value in GGUFFile(path).metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            sub_type = value_type(value[0], key) if value else GGUFValueType.STRING
            sub_type = GGUFValueType.INT32 if sub_type == GGUFValueType.UINT32 else sub_type
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=sub_type)
        else:
            writer.add_key_value(key, value, value_type(value, key))


def _add_tekken(writer: GGUFWriter, folder: Path) -> None:
    import importlib

    import gguf.vocab

    # `import levante` loads gguf without its mistral-common tokenizers (levante/__init__.py);
    # MistralVocab needs them: load gguf.vocab again with mistral-common importable.
    if not gguf.vocab._mistral_common_installed:
        importlib.reload(gguf.vocab)
    vocab = gguf.vocab.MistralVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)
    writer.add_tokenizer_pre("tekken")
    writer.add_token_merges(vocab.extract_vocab_merges_from_model())
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_bpe(writer: GGUFWriter, folder: Path) -> None:
    from gguf.vocab import BpeVocab, SpecialVocab

    vocab = BpeVocab(folder)
    tokens, _, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("gpt2")
    # llama.cpp's converter names the pre-tokenizer by hashing sample encodings; we cannot
    # tell which regex a tokenizer.json's pre-tokenizer matches, so say so and use GPT-2's.
    log.warning("%s: pre-tokenizer unknown to llama.cpp's table; writing tokenizer.ggml.pre "
                "= 'gpt2' (check tokenization of the output)", folder)
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _write_levante(source: TensorSource, fmt: str, out: Path, progress: bool) -> dict[str, int]:
    """Levante's int8/int4 safetensors folder (format in the module docstring)."""
    config = source.config
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    names = list(expected_shapes(config))
    if config.tie_embeddings:  # the int8 head is stored even when tied
        names.append("lm_head.weight")
    with _progress(progress, f"quantizing to {fmt}", len(names)) as advance:
        for name in names:
            tensors.update(quantized_tensors(fmt, name, source.load(name, None)))
            advance()
    metadata = {QUANT_METADATA_KEY: json.dumps(
        {"version": QUANT_FORMAT_VERSION, "format": fmt, "group_size": 32})}
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    _copy_tokenizer(source, out)
    return _count(str(t.dtype).removeprefix("torch.") for t in tensors.values())


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """A transformers-style config.json that `ModelConfig.from_hf` reads back to `config`."""
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "vocab_size": config.vocab_size, "hidden_size": config.dim,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "intermediate_size": config.ffn_dim, "rope_theta": config.rope_theta,
            "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_id,
            "eos_token_id": list(config.eos_ids), "sliding_window": None,
            "torch_dtype": "bfloat16"}


def _copy_tokenizer(source: TensorSource, out: Path) -> None:
    if source.gguf_path is None:
        for name in TOKENIZER_FILES:
            if (source.path / name).exists():
                shutil.copy(source.path / name, out / name)
        return
    from levante.gguf_vocab import TEKKEN_PRE, tekken_json_from_gguf
    from levante.tokenizer import HFTokenizer
    from levante.weights.gguf import GGUFFile

    meta = GGUFFile(source.gguf_path).metadata
    if meta.get("tokenizer.ggml.pre") == TEKKEN_PRE:  # Mistral's own file, as its folders have
        data = tekken_json_from_gguf(meta, source.gguf_path)
        (out / "tekken.json").write_text(json.dumps(data))
        return
    tokenizer = HFTokenizer.from_gguf_metadata(meta, path=source.gguf_path)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    settings: dict[str, Any] = {"add_bos_token": tokenizer.should_add_bos}
    if tokenizer.bos_id is not None:
        settings["bos_token"] = tokens[tokenizer.bos_id]
    if "tokenizer.ggml.eos_token_id" in meta:
        settings["eos_token"] = tokens[int(meta["tokenizer.ggml.eos_token_id"])]
    if "tokenizer.chat_template" in meta:
        settings["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


@contextmanager
def _progress(enabled: bool, label: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar (when enabled); the callback advances it by `amount` (default 1)."""
    if not enabled:
        yield lambda amount=1: None
        return
    with Progress(transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda amount=1: bar.advance(task, amount)


def _count(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts
