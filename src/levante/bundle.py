"""Bundle: a loaded model with its config, tokenizer and chat format, from any model ref."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from levante.chat import ChatFormat, JinjaChatFormat, MistralChatFormat
from levante.config import ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.gguf_vocab import TEKKEN_PRE
from levante.heap import compact_heap, release_free_memory
from levante.kinds import WeightFormat
from levante.load_config import DTYPES, GGUF_LOAD_FORMATS, LoadConfig, dtype_name
from levante.model import MLP, Attention, Transformer
from levante.quant.gguf_blocks import FLOAT_DTYPES
from levante.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer
from levante.weights.gguf import GGUFFile, check_fits_config, load_gguf_state_dict
from levante.weights.hub import resolve
from levante.weights.safetensors import (
    consolidated_shards,
    hf_shards,
    load_safetensors_state_dict,
)

log = logging.getLogger(__name__)
SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass
class Bundle:
    """Everything needed to generate with one model."""

    name: str
    path: Path
    format: WeightFormat
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat | None
    load_config: LoadConfig = field(default_factory=LoadConfig)  # as loaded: concrete values


def load(ref: str, config: LoadConfig | None = None, *, dtype: torch.dtype | str | None = None,
         device: str | None = None, max_seq_len: int | None = None,
         quant: str | None = None) -> Bundle:
    """Resolve `ref` (registry name, local path or hub repo) and load it as `config` says.

    The device is resolved and checked first (`LoadConfig.on_device`), so a missing GPU
    fails before anything is downloaded or read. dtype "auto" keeps the checkpoint's own
    precision (`checkpoint_dtype`: bf16 safetensors stay bf16); a quantized GGUF computed
    from its blocks has float32 activations; float32 is used only where asked for or where
    nothing else is stored. quant: "auto" computes with a GGUF file's own blocks on the CPU
    (elsewhere they are dequantized to the device's dtype, as "none" does everywhere) and
    keeps a safetensors checkpoint's float weights; "gguf" insists on the blocks; "int8" /
    "int4" quantize a float checkpoint's linears at load, "fp8" its decoder linears to
    float8_e4m3fn (`quant.fp8`: fp8 matmuls on Ada/Hopper GPUs, weight-only elsewhere; each
    weight is quantized as it reaches the device, so the device never holds the bf16 model),
    and "q8_0" / "q4_k_m" / ... to the GGUF types llama.cpp's quantizer would write (CPU
    kernels, float32 activations). The returned Bundle's `load_config` holds the concrete
    choices.

    The keyword arguments build the LoadConfig for callers written before it (`dtype` as a
    torch dtype or a name); they cannot be combined with `config`.
    """
    config = _config_of(config, dtype=dtype, device=device, max_seq_len=max_seq_len,
                        quant=quant).on_device()
    path = resolve(ref)
    with compact_heap():  # the load's temporaries go back to the OS, not into heap holes
        return _load(ref, path, config)


def _load(ref: str, path: Path, config: LoadConfig) -> Bundle:
    if path.is_file():
        bundle = _load_gguf(ref, path, config)
    elif (path / "config.json").exists():
        bundle = _load_hf(ref, path, config)
    elif (path / "params.json").exists():
        bundle = _load_consolidated(ref, path, config)
    else:
        raise ModelFileError(path, "folder has neither config.json nor params.json")
    loaded = bundle.load_config
    if loaded.quant in ("int8", "int4"):
        from levante.quant.linear import quantize_model

        quantize_model(bundle.model, loaded.quant)
    elif loaded.quant == "fp8":  # built on the CPU (`_build_device`): one weight at a time
        from levante.quant.fp8 import quantize_model_fp8

        bundle.model = quantize_model_fp8(bundle.model, device=loaded.device).to(loaded.device)
    elif loaded.quant in GGUF_LOAD_FORMATS:  # the float weights become GGUF blocks, one by one
        from levante.quant.gguf_model import quantize_model_gguf

        quantize_model_gguf(bundle.model, loaded.quant)
        loaded = bundle.load_config = loaded.replace(dtype="float32")  # the kernels' activations
    log.info("%s: on %s, %s, quant %s", path.name, loaded.device, loaded.dtype, loaded.quant)
    return bundle


def _config_of(config: LoadConfig | None, *, dtype: torch.dtype | str | None,
               device: str | None, max_seq_len: int | None, quant: str | None) -> LoadConfig:
    """`config`, or one built from the older keyword form of `load`."""
    keywords: dict[str, Any] = {
        "dtype": dtype if dtype is None or isinstance(dtype, str) else dtype_name(dtype),
        "device": device, "max_model_len": max_seq_len, "quant": quant}
    given = {k: v for k, v in keywords.items() if v is not None}
    if config is not None and given:
        raise ConfigError(f"load() takes a LoadConfig or the keywords {', '.join(given)}, "
                          "not both")
    return config or LoadConfig(**given)


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The float precision a resolved checkpoint stores its weights in, read from headers.

    HF folders: config.json's `torch_dtype` (or `dtype`), else the safetensors tensors'
    most common dtype; consolidated folders: the tensors'; a GGUF file: its projection
    tensors' float type, or None where they are quantized blocks.
    """
    if path.is_file():
        return _gguf_float_dtype(GGUFFile(path))
    if (path / "config.json").exists():
        hf = read_json_object(path / "config.json")
        named = hf.get("torch_dtype", hf.get("dtype"))
        if isinstance(named, str) and named in DTYPES:
            return DTYPES[named]
        return safetensors_dtype(hf_shards(path))
    return safetensors_dtype(consolidated_shards(path))


def safetensors_dtype(files: list[Path]) -> torch.dtype | None:
    """The float dtype holding most of the checkpoint's elements, from the file headers."""
    counts: Counter[torch.dtype] = Counter()
    for path in files:
        if not path.exists():
            continue  # the loader's header check names the missing shard
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    header = f.get_slice(name)
                    stored = SAFETENSORS_FLOATS.get(header.get_dtype())
                    if stored is not None:
                        counts[stored] += math.prod(header.get_shape())
        except (OSError, SafetensorError) as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    return counts.most_common(1)[0][0] if counts else None


def _gguf_float_dtype(gguf_file: GGUFFile) -> torch.dtype | None:
    """A GGUF's projection weights' float dtype (most common by size); None if any is
    quantized. Norms (always F32) and the token embedding (looked up by row) do not count."""
    sizes: Counter[torch.dtype] = Counter()
    for name in gguf_file.tensor_names:
        if len(gguf_file.tensor_shape(name)) != 2 or name == "token_embd.weight":
            continue
        qtype = gguf_file.tensor_type(name)
        if qtype not in FLOAT_DTYPES:
            return None
        sizes[FLOAT_DTYPES[qtype]] += gguf_file.nbytes(name)
    return sizes.most_common(1)[0][0] if sizes else None


def _limit(config: ModelConfig, max_seq_len: int | None) -> ModelConfig:
    if max_seq_len is None:
        return config
    if max_seq_len > config.max_seq_len:
        raise ConfigError(f"max_model_len {max_seq_len} exceeds the model's context "
                          f"{config.max_seq_len}")
    return config.replace(max_seq_len=max_seq_len)


def _gguf_quant(load_config: LoadConfig, gguf_file: GGUFFile) -> LoadConfig:
    """quant and dtype made concrete for a GGUF file on the (resolved) device."""
    quant, device = load_config.quant, load_config.device
    if quant == "fp8":
        raise ConfigError(f"--quant fp8 quantizes a float (safetensors) checkpoint at load; "
                          f"{gguf_file.path.name} is a GGUF and runs from its own blocks "
                          f"(--quant auto), or dequantized (--quant none); for fp8, load the "
                          f"model's safetensors checkpoint")
    if quant in GGUF_LOAD_FORMATS:
        raise ConfigError(f"--quant {quant} quantizes a float checkpoint at load; "
                          f"{gguf_file.path.name} is a GGUF and runs from its own blocks "
                          f"(--quant auto), or make it {quant} with `levante quantize --to "
                          f"{quant}` from its float checkpoint")
    if quant == "auto":
        quant = "gguf" if device == "cpu" else "none"
    if quant == "gguf" and device != "cpu":
        raise ConfigError(f"--quant gguf computes with CPU kernels, not on {device}; use "
                          f"--quant auto or none: the blocks are then dequantized on {device}")
    stored = _gguf_float_dtype(gguf_file)
    if quant == "gguf" and stored is None:
        stored = torch.float32  # the block kernels take float32 activations
    resolved = load_config.replace(quant=quant).with_dtype(stored)
    if stored is None:
        log.info("%s: GGUF blocks dequantized to %s on %s", gguf_file.path.name,
                 resolved.dtype, device)
    return resolved


def _load_gguf(ref: str, path: Path, load_config: LoadConfig) -> Bundle:
    gguf_file = GGUFFile(path)
    meta = gguf_file.metadata
    try:
        config = ModelConfig.from_gguf(meta, has_output_tensor="output.weight"
                                       in gguf_file.tensor_names)
    except ConfigError as e:
        raise ModelFileError(path, str(e)) from None
    check_fits_config(gguf_file, config)  # every tensor, for both paths, before any is read
    load_config = _gguf_quant(load_config, gguf_file)
    tokenizer, chat = _gguf_tokenizer(path, meta)
    for key in VOCAB_KEYS:  # the tokenizer has them now; freed before the weights' peak
        meta.pop(key, None)
    release_free_memory()
    config = _limit(config, load_config.max_model_len)
    dtype, device = load_config.torch_dtype, load_config.device
    if load_config.quant == "gguf":
        from levante.quant.gguf_model import load_gguf_quantized

        model = load_gguf_quantized(gguf_file, config, dtype)
        return Bundle(ref, path, WeightFormat.GGUF, config, model.to(device), tokenizer, chat, load_config)
    state = load_gguf_state_dict(gguf_file, config, dtype)
    return Bundle(ref, path, WeightFormat.GGUF, config, Transformer.from_state_dict(config, state, device=device),
                  tokenizer, chat, load_config)


# The vocabulary arrays of a GGUF's metadata: SmolLM2's 49152 tokens and 48900 merges are
# ~12 MB of Python strings that no one reads once the tokenizer is built.
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "tokenizer.ggml.scores")

# What malformed tokenizer metadata raises inside `tokenizers`/jinja2 (untrusted input).
METADATA_ERRORS = (TypeError, ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError)


def _gguf_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[Tokenizer, ChatFormat | None]:
    """A GGUF's tokenizer and chat template; bad metadata is a ModelFileError naming the file.

    A Tekken vocabulary gets mistral-common's tokenizer and V7 format, as a tekken.json folder
    does; its Jinja template is not used (why: levante/gguf_vocab.py).
    """
    try:
        if meta.get("tokenizer.ggml.pre") == TEKKEN_PRE:
            mistral = MistralTokenizer.from_gguf_metadata(meta, path=path)
            return mistral, MistralChatFormat(mistral)
        tokenizer = HFTokenizer.from_gguf_metadata(meta, path=path)
        template = meta.get("tokenizer.chat_template")
        chat = JinjaChatFormat.from_gguf_metadata(meta, tokenizer) if template else None
    except ModelFileError:
        raise
    except METADATA_ERRORS as e:
        raise ModelFileError(path, f"bad tokenizer or chat template metadata: "
                             f"{type(e).__name__}: {e}") from None
    return tokenizer, chat


def read_json_object(path: Path) -> dict[str, Any]:
    """A model file's JSON object (config.json, params.json, ...); errors name the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _safetensors_quant(load_config: LoadConfig, path: Path, stored: torch.dtype | None
                       ) -> LoadConfig:
    """quant and dtype made concrete for a safetensors checkpoint."""
    if load_config.quant == "gguf":
        raise ConfigError(f"--quant gguf needs a GGUF file; {path} is a safetensors folder "
                          f"(use int8, int4 or fp8)")
    quant = "none" if load_config.quant == "auto" else load_config.quant
    if quant == "fp8":
        from levante.quant.fp8 import check_device

        check_device(load_config.device)
    if quant in GGUF_LOAD_FORMATS and load_config.device != "cpu":
        raise ConfigError(f"--quant {quant} computes with the CPU's GGUF kernels, not on "
                          f"{load_config.device}; use --quant none, int8, int4 or fp8 there")
    return load_config.replace(quant=quant).with_dtype(stored)


def _load_hf(ref: str, path: Path, load_config: LoadConfig) -> Bundle:
    hf = read_json_object(path / "config.json")
    if "auto_map" in hf:
        raise ModelFileError(path / "config.json", "declares auto_map (remote code); Levante "
                             "never runs code shipped with a model")
    try:
        config = ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ModelFileError(path / "config.json", str(e)) from None
    load_config = _safetensors_quant(load_config, path, checkpoint_dtype(path))
    state = load_safetensors_state_dict(hf_shards(path), config, dtype=load_config.torch_dtype,
                                        row_groups=_row_groups(config, load_config))
    tokenizer, chat = load_tokenizer(path)
    config = _limit(config, load_config.max_model_len)
    model = Transformer.from_state_dict(config, state, device=_build_device(load_config))
    return Bundle(ref, path, WeightFormat.SAFETENSORS_HF, config, model, tokenizer, chat, load_config)


def _build_device(load_config: LoadConfig) -> str:
    """Where the float model is built: "fp8" builds it on the CPU (the checkpoint's memory
    map) and moves each weight to the device only as it is quantized."""
    return "cpu" if load_config.quant == "fp8" else load_config.device


def _row_groups(config: ModelConfig, load_config: LoadConfig) -> list[tuple[str, ...]]:
    """`fused_row_groups`, except under "fp8": every weight is replaced by its fp8 codes, so
    reading q/k/v and gate/up into joined float buffers would only hold the float model in
    memory; left in the memory map, each weight is read once, as it is quantized."""
    return [] if load_config.quant == "fp8" else fused_row_groups(config)


def fused_row_groups(config: ModelConfig) -> list[tuple[str, ...]]:
    """The weights each layer joins into one matmul (q/k/v, gate/up), to be read as one
    buffer each: joining them when the engine fuses projections then copies nothing."""
    return [tuple(f"model.layers.{i}.{block}.{part}.weight" for part in kind.part_names)
            for i in range(config.num_layers)
            for block, kind in (("self_attn", Attention), ("mlp", MLP))]


def _load_consolidated(ref: str, path: Path, load_config: LoadConfig) -> Bundle:
    try:
        config = ModelConfig.from_params(read_json_object(path / "params.json"))
    except ConfigError as e:
        raise ModelFileError(path / "params.json", str(e)) from None
    files = consolidated_shards(path)
    load_config = _safetensors_quant(load_config, path, safetensors_dtype(files))
    state = load_safetensors_state_dict(files, config, dtype=load_config.torch_dtype,
                                        consolidated=True,
                                        row_groups=_row_groups(config, load_config))
    tokenizer, chat = load_tokenizer(path)
    config = _limit(config, load_config.max_model_len)
    model = Transformer.from_state_dict(config, state, device=_build_device(load_config))
    return Bundle(ref, path, WeightFormat.SAFETENSORS_CONSOLIDATED, config, model, tokenizer, chat,
                  load_config)


def load_tokenizer(path: Path) -> tuple[Tokenizer, ChatFormat | None]:
    """A folder's tokenizer and chat format: tekken.json selects Mistral's (V7 instruct),
    else HF tokenizer files."""
    tekken = path / "tekken.json"
    if tekken.exists():
        mistral = MistralTokenizer.from_file(tekken)
        return mistral, MistralChatFormat(mistral)
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.exists():
        raise ModelFileError(path, "no tokenizer: expected tekken.json or tokenizer.json")
    config_path = path / "tokenizer_config.json"
    tokenizer = HFTokenizer.from_file(tokenizer_json,
                                      config_path if config_path.exists() else None)
    has_template = (path / "chat_template.jinja").exists() or (
        config_path.exists() and read_json_object(config_path).get("chat_template") is not None)
    chat = JinjaChatFormat.from_hf_config(config_path, tokenizer) if has_template else None
    return tokenizer, chat
