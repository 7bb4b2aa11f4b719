"""Levante's int8/int4 checkpoint (safetensors): what `levante quantize --to int8|int4` writes
and how it loads back into `linear.Int8Linear` / `linear.Int4Linear` layers; and
`model_skeleton`, the unwritten Transformer that loaders fill module by module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from levante.config import ModelConfig
from levante.errors import ModelFileError
from levante.model import Transformer
from levante.quant.linear import (
    FORMATS,
    Int4Linear,
    Int8Linear,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from levante.weights.layout import expected_shapes


class _SkipInit(TorchFunctionMode):
    """Skip `torch.nn.init` calls while building modules whose weights are replaced anyway."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def model_skeleton(config: ModelConfig) -> Transformer:
    """A Transformer whose weights are allocated but never written, to be replaced module by module.

    Not the meta device: initializing meta tensors (and the rotary table) goes through
    torch._refs, which imports torch._dynamo: +4 s and +76 MB resident, more than half of
    SmolLM2's quantized weights. These CPU tensors are never touched, so they take no resident
    memory, and each is freed when the module holding it is replaced.
    """
    with _SkipInit():
        return Transformer(config)


# Levante's int8/int4 checkpoint (safetensors), version 1. Header metadata QUANT_METADATA_KEY =
# '{"version": 1, "format": "int8"|"int4", "group_size": 32}'. A quantized linear P.weight is
# int8: P.qweight int8 [N, K] + P.scales f32 [N]           (w = q * scale)
# int4: P.qweight uint8 [N, K/2] (pack_nibbles) + P.scales, P.mins f16 [N, K/g] (as Q4_1)
#       (w = code * scale + min)
# The output head is int8 in both (as quantize_model) and present even when tied; norms are
# f32, the embedding bf16, names as in HF checkpoints.
QUANT_METADATA_KEY = "levante.quant"
QUANT_FORMAT_VERSION = 1


def quantized_tensors(fmt: str, name: str, weight: torch.Tensor,
                      group_size: int = 32) -> dict[str, torch.Tensor]:
    """What Levante's checkpoint stores for tensor `name` (HF naming) under format `fmt`."""
    if weight.dim() == 1:
        return {name: weight.float()}
    if name == "model.embed_tokens.weight":
        return {name: weight.to(torch.bfloat16)}
    stem = name.removesuffix(".weight")
    if fmt == "int8" or name == "lm_head.weight":
        codes, scales = quantize_int8(weight)
        return {f"{stem}.qweight": codes, f"{stem}.scales": scales}
    codes, scales, mins = quantize_int4(weight, group_size)
    return {f"{stem}.qweight": pack_nibbles(codes), f"{stem}.scales": scales.half(),
            f"{stem}.mins": mins.half()}


def read_quant_metadata(path: Path) -> dict[str, Any] | None:
    """The `levante.quant` header of a safetensors file, checked; None for a float checkpoint."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get(QUANT_METADATA_KEY)
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"{QUANT_METADATA_KEY} header is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != QUANT_FORMAT_VERSION \
            or meta.get("format") not in FORMATS:
        raise ModelFileError(path, f"{QUANT_METADATA_KEY} header {text!r} is not version "
                                   f"{QUANT_FORMAT_VERSION} of int8/int4")
    return meta


def load_quantized_checkpoint(files: list[Path], config: ModelConfig, dtype: torch.dtype, *,
                              kernel: str | None = None) -> Transformer:
    """A Transformer from Levante int8/int4 safetensors (see `quantized_tensors`), on CPU."""
    from safetensors.torch import load_file

    stored: dict[str, torch.Tensor] = {}
    for path in files:
        stored.update(load_file(path))
    model = model_skeleton(config)
    where = files[0] if len(files) == 1 else files[0].parent
    for name, shape in {**expected_shapes(config), "lm_head.weight": (0,)}.items():
        if name in stored:
            _assign(model, name, nn.Parameter(stored.pop(name).to(dtype), requires_grad=False))
            continue
        stem = name.removesuffix(".weight")
        try:
            codes, scales = stored.pop(f"{stem}.qweight"), stored.pop(f"{stem}.scales")
            if codes.dtype == torch.int8:
                linear: Int8Linear | Int4Linear = Int8Linear(codes, scales, kernel=kernel)
            else:
                linear = Int4Linear(unpack_nibbles(codes), scales, stored.pop(f"{stem}.mins"),
                                    kernel=kernel)
        except KeyError as e:
            raise ModelFileError(where, f"missing tensor {e.args[0]}") from None
        if name != "lm_head.weight" and (linear.out_features, linear.in_features) != shape:
            raise ModelFileError(where, f"{stem} holds a {linear.out_features}x"
                                        f"{linear.in_features} weight, expected {shape}")
        _assign(model, stem, linear)
    return model.eval()


def _assign(model: nn.Module, path: str, value: nn.Module | nn.Parameter) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, value)
