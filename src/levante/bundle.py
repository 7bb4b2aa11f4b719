"""Bundle: a loaded model with its config, tokenizer and chat format, from any model ref."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from levante.chat import ChatFormat, JinjaChatFormat, MistralChatFormat
from levante.config import ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.gguf_vocab import TEKKEN_PRE
from levante.model import Transformer
from levante.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer
from levante.weights.gguf import GGUFFile, check_fits_config, load_gguf_state_dict
from levante.weights.hub import resolve
from levante.weights.safetensors import hf_shards, load_safetensors_state_dict

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """Everything needed to generate with one model."""

    name: str
    path: Path
    format: str  # "gguf" | "safetensors-hf" | "safetensors-consolidated"
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat | None


QUANT_FORMATS = ("auto", "none", "gguf", "int8", "int4")


def load(ref: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
         max_seq_len: int | None = None, quant: str = "auto") -> Bundle:
    """Resolve `ref` (registry name, local path or hub repo) and load it ready to run.

    quant: "auto" (the default) computes with a GGUF file's own blocks on the CPU and keeps
    a safetensors checkpoint's float weights; "none" keeps float weights (a GGUF is
    dequantized to `dtype`); "gguf" computes with a GGUF file's own blocks, never building
    the float model; "int8" / "int4" quantize a float checkpoint's linears at load.
    """
    if quant not in QUANT_FORMATS:
        raise ConfigError(f"quant must be one of {', '.join(QUANT_FORMATS)}, got {quant!r}")
    path = resolve(ref)
    if quant == "auto":  # the block kernels are CPU code; other devices get float weights
        quant = "gguf" if path.is_file() and torch.device(device).type == "cpu" else "none"
    if quant == "gguf" and not path.is_file():
        raise ConfigError(f"--quant gguf needs a GGUF file; {ref} is a safetensors folder "
                          f"(use int8 or int4)")
    if path.is_file():
        bundle = _load_gguf(ref, path, dtype, device, max_seq_len, keep_blocks=quant == "gguf")
    elif (path / "config.json").exists():
        bundle = _load_hf(ref, path, dtype, device, max_seq_len)
    elif (path / "params.json").exists():
        bundle = _load_consolidated(ref, path, dtype, device, max_seq_len)
    else:
        raise ModelFileError(path, "folder has neither config.json nor params.json")
    if quant in ("int8", "int4"):
        from levante.quant.linear import quantize_model

        quantize_model(bundle.model, quant)
    return bundle


def _limit(config: ModelConfig, max_seq_len: int | None) -> ModelConfig:
    if max_seq_len is None:
        return config
    if max_seq_len > config.max_seq_len:
        raise ConfigError(f"max_model_len {max_seq_len} exceeds the model's context "
                          f"{config.max_seq_len}")
    return config.replace(max_seq_len=max_seq_len)


def _load_gguf(ref: str, path: Path, dtype: torch.dtype, device: str,
               max_seq_len: int | None, *, keep_blocks: bool = False) -> Bundle:
    gguf_file = GGUFFile(path)
    meta = gguf_file.metadata
    try:
        config = ModelConfig.from_gguf(meta, has_output_tensor="output.weight"
                                       in gguf_file.tensor_names)
    except ConfigError as e:
        raise ModelFileError(path, str(e)) from None
    check_fits_config(gguf_file, config)  # every tensor, for both paths, before any is read
    tokenizer, chat = _gguf_tokenizer(path, meta)
    config = _limit(config, max_seq_len)
    if keep_blocks:
        from levante.quant.gguf_linear import load_gguf_quantized

        model = load_gguf_quantized(gguf_file, config, dtype)
        return Bundle(ref, path, "gguf", config, model.to(device), tokenizer, chat)
    state = load_gguf_state_dict(gguf_file, config, dtype)
    return Bundle(ref, path, "gguf", config, Transformer.from_state_dict(config, state, device=device),
                  tokenizer, chat)


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


def _load_hf(ref: str, path: Path, dtype: torch.dtype, device: str,
             max_seq_len: int | None) -> Bundle:
    hf = read_json_object(path / "config.json")
    if "auto_map" in hf:
        raise ModelFileError(path / "config.json", "declares auto_map (remote code); Levante "
                             "never runs code shipped with a model")
    try:
        config = ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ModelFileError(path / "config.json", str(e)) from None
    state = load_safetensors_state_dict(hf_shards(path), config, dtype=dtype)
    tokenizer, chat = load_tokenizer(path)
    config = _limit(config, max_seq_len)
    return Bundle(ref, path, "safetensors-hf", config, Transformer.from_state_dict(config, state, device=device),
                  tokenizer, chat)


def _load_consolidated(ref: str, path: Path, dtype: torch.dtype, device: str,
                       max_seq_len: int | None) -> Bundle:
    try:
        config = ModelConfig.from_params(read_json_object(path / "params.json"))
    except ConfigError as e:
        raise ModelFileError(path / "params.json", str(e)) from None
    files = sorted(path.glob("consolidated*.safetensors"))
    if not files:
        raise ModelFileError(path, "no consolidated*.safetensors file")
    state = load_safetensors_state_dict(files, config, dtype=dtype, consolidated=True)
    tokenizer, chat = load_tokenizer(path)
    config = _limit(config, max_seq_len)
    return Bundle(ref, path, "safetensors-consolidated",
                  config, Transformer.from_state_dict(config, state, device=device), tokenizer, chat)


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
