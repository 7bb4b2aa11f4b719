"""safetensors checkpoints: HF names (single or sharded) and Mistral consolidated names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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

    Consolidated checkpoints are renamed and their q/k rows un-permuted to rotate-half.
    """
    expected = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            raise ModelFileError(path, "shard listed in the index is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    target = _target_name(name, consolidated)
                    if target is None or target not in expected:
                        log.debug("%s: ignoring tensor %s", path, name)
                        continue
                    tensor = f.get_tensor(name)
                    state[target] = _checked(path, name, target, tensor, config, expected,
                                             consolidated=consolidated).to(dtype)
        except SafetensorError as e:
            raise ModelFileError(path, f"not a valid safetensors file ({e})") from None
    missing = [n for n in expected if n not in state]
    if missing:
        where = files[0] if len(files) == 1 else files[0].parent
        raise ModelFileError(where, f"missing tensor {missing[0]}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return state


def _target_name(name: str, consolidated: bool) -> str | None:
    if not consolidated:
        return name
    return hf_name(name, layer_names=CONSOLIDATED_LAYER_NAMES,
                   global_names=CONSOLIDATED_GLOBAL_NAMES, layer_prefix="layers.")


def _checked(path: Path, name: str, target: str, tensor: torch.Tensor, config: ModelConfig,
             expected: dict[str, tuple[int, ...]], *, consolidated: bool) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if shape != expected[target]:
        raise ModelFileError(path, f"tensor {name} has shape {shape}, expected "
                             f"{expected[target]} from the config")
    if not tensor.is_floating_point():
        raise ModelFileError(path, f"tensor {name} has dtype {tensor.dtype}, expected a float")
    if consolidated and target.endswith("q_proj.weight"):
        return interleaved_to_half(tensor, config.num_heads)
    if consolidated and target.endswith("k_proj.weight"):
        return interleaved_to_half(tensor, config.num_kv_heads)
    return tensor
