"""safetensors checkpoints: HF names (single or sharded) and Mistral consolidated names."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.weights.layout import (
    CONSOLIDATED_GLOBAL_NAMES,
    CONSOLIDATED_LAYER_NAMES,
    expected_shapes,
    hf_name,
    interleaved_to_half,
)

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
TIE_KEY = {False: "tie_word_embeddings", True: "tied_embeddings"}
# Buffers some checkpoints carry that hold nothing a model computes with: rotary inverse
# frequencies follow from rope_theta (transformers recomputes them too).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_shards(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: from the shard index, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(index, f"malformed shard index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelFileError(folder, "no model.safetensors or model.safetensors.index.json")


def load_safetensors_state_dict(files: list[Path], config: ModelConfig, *, dtype: torch.dtype,
                                consolidated: bool = False) -> dict[str, torch.Tensor]:
    """Read tensors from memory-mapped files into our (HF) names, checked against the config.

    Every tensor's name, shape and dtype is checked from the file headers before any weight
    is read (`check_safetensors_files`). Consolidated checkpoints are renamed and their q/k
    rows un-permuted to rotate-half.
    """
    sources = check_safetensors_files(files, config, consolidated=consolidated)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        wanted = {name: target for target, (where, name) in sources.items() if where == path}
        if not wanted:
            continue
        try:
            with safe_open(path, framework="pt") as f:
                for name, target in wanted.items():
                    tensor = _converted(f.get_tensor(name), target, config, consolidated)
                    state[target] = tensor.to(dtype)
        except SafetensorError as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    head = state.pop(TIED_HEAD, None) if config.tie_embeddings else None
    if head is not None and not torch.equal(head, state[EMBEDDING]):
        path, name = sources[TIED_HEAD]
        raise ModelFileError(path, f"tensor {name} differs from the embedding, but "
                             f"{_config_file(consolidated)} ties the output head to the "
                             f"embedding ({TIE_KEY[consolidated]} true): Levante will not "
                             f"guess which of the two the model computes with")
    return state


def check_safetensors_files(files: list[Path], config: ModelConfig, *, consolidated: bool = False
                            ) -> dict[str, tuple[Path, str]]:
    """Where each tensor the config needs lies, {our name: (file, stored name)}, from headers.

    Refuses (ModelFileError naming the file and tensor) a shape or dtype the config does not
    imply, a tensor the model has no place for (biases, unknown names, an output head in a
    tied model unless it equals the embedding), a name stored twice, and missing tensors.
    """
    required = expected_shapes(config)
    # A tied model may store its head too: accepted if it equals the embedding (checked on read).
    allowed = {**required, TIED_HEAD: required[EMBEDDING]} if config.tie_embeddings else required
    sources: dict[str, tuple[Path, str]] = {}
    for path in files:
        if not path.exists():
            raise ModelFileError(path, "shard listed in the index is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    target = _placed(path, name, f.get_slice(name), allowed, config,
                                     consolidated=consolidated)
                    if target in sources:
                        raise ModelFileError(path, f"tensor {name} is also stored in "
                                             f"{sources[target][0]}")
                    if target is not None:
                        sources[target] = (path, name)
        except SafetensorError as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    missing = sorted((n for n in required if n not in sources), key=lambda n: n != TIED_HEAD)
    if missing:
        where = files[0] if len(files) == 1 else files[0].parent
        untied = (f" ({_config_file(consolidated)} has {TIE_KEY[consolidated]} false: the "
                  f"output head is its own tensor)" if missing[0] == TIED_HEAD else "")
        raise ModelFileError(where, f"missing tensor {missing[0]}{untied}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return sources


def _target_name(name: str, consolidated: bool) -> str | None:
    if not consolidated:
        return name
    return hf_name(name, layer_names=CONSOLIDATED_LAYER_NAMES,
                   global_names=CONSOLIDATED_GLOBAL_NAMES, layer_prefix="layers.")


def _placed(path: Path, name: str, header: Any, allowed: dict[str, tuple[int, ...]],
            config: ModelConfig, *, consolidated: bool) -> str | None:
    """Our name for stored tensor `name` after checking its header; None for a known no-op."""
    target = _target_name(name, consolidated)
    if target is None or target not in allowed:
        if name.endswith(IGNORED_SUFFIXES):
            log.debug("%s: ignoring tensor %s", path, name)
            return None
        if name.endswith(".bias"):
            raise ModelFileError(path, f"tensor {name} is a bias: projection biases "
                                 "(attention_bias, mlp_bias, Qwen2-style q/k/v biases) are not "
                                 "implemented in Levante")
        raise ModelFileError(path, f"tensor {name} has no place in the model "
                             f"{_config_file(consolidated)} describes ({config.num_layers} "
                             f"layers, {TIE_KEY[consolidated]} {config.tie_embeddings}): Levante "
                             f"would not compute with it")
    shape = tuple(header.get_shape())
    if shape != allowed[target]:
        raise ModelFileError(path, f"tensor {name} has shape {shape}, expected "
                             f"{allowed[target]} from the config")
    if not header.get_dtype().startswith(("F", "BF")):
        raise ModelFileError(path, f"tensor {name} has dtype {header.get_dtype()}, expected "
                             "a float")
    return target


def _converted(tensor: torch.Tensor, target: str, config: ModelConfig,
               consolidated: bool) -> torch.Tensor:
    """Consolidated q/k rows from interleaved to rotate-half order; others as they are."""
    if consolidated and target.endswith("q_proj.weight"):
        return interleaved_to_half(tensor, config.num_heads)
    if consolidated and target.endswith("k_proj.weight"):
        return interleaved_to_half(tensor, config.num_kv_heads)
    return tensor


def _config_file(consolidated: bool) -> str:
    return "params.json" if consolidated else "config.json"
