"""LoadConfig: how a model is loaded: device, dtype, quant, KV dtype, context, memory budget.

Each entry point (a CLI command, the server, `LLM`) builds one and hands it to `bundle.load`,
which makes its "auto" values concrete for this machine and this checkpoint (`on_device`,
`with_dtype`) and records the result on the Bundle; nothing downstream picks a device or a
dtype again.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from levante.config import KV_CACHE_DTYPES
from levante.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)
# GGUF formats a float checkpoint can be quantized to at load (`gguf_model.quantize_model_gguf`)
GGUF_LOAD_FORMATS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m")
QUANT_FORMATS = ("auto", "none", "gguf", "int8", "int4", "fp8", *GGUF_LOAD_FORMATS)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"; a dtype Levante does not load weights in is an error."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")


@dataclass(frozen=True)
class LoadConfig:
    """What `bundle.load` needs besides the model ref; "auto" values are resolved at load."""

    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto: the checkpoint's own precision | float32 | bfloat16 | float16
    quant: str = "auto"  # auto | none | gguf | int8 | int4 | fp8 | q8_0 ... (see `bundle.load`)
    kv_cache_dtype: str = "auto"  # auto: the activations' dtype
    max_model_len: int | None = None  # tokens per sequence; None: the model's context
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: sized automatically

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"LoadConfig.device must be auto, cpu, cuda, cuda:N or mps, "
                              f"got {self.device!r}")
        for name, allowed in (("dtype", DTYPE_NAMES), ("quant", QUANT_FORMATS),
                              ("kv_cache_dtype", KV_CACHE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"LoadConfig.{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("max_model_len", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value <= 0):
                raise ConfigError(f"LoadConfig.{name} must be a positive integer or None, "
                                  f"got {value!r}")

    def replace(self, **changes: Any) -> LoadConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The weights' torch dtype; only once `with_dtype` has resolved "auto"."""
        if self.dtype == "auto":
            raise ConfigError("LoadConfig.dtype is still 'auto': resolve it with with_dtype()")
        return DTYPES[self.dtype]

    def on_device(self) -> LoadConfig:
        """This config with a concrete device that exists here, before any weight is read.

        "auto" picks CUDA, then MPS, then the CPU, and logs which; an explicit device this
        machine lacks is a ConfigError naming what is missing.
        """
        if self.device == "auto":
            picked = ("cuda" if torch.cuda.is_available() else
                      "mps" if _has_mps() else "cpu")
            log.info("device auto: %s (%s)", picked, _why(picked))
            return self.replace(device=picked)
        if self.device.startswith("cuda"):
            _check_cuda(self.device)
        elif self.device == "mps" and not _has_mps():
            built = torch.backends.mps.is_built()
            raise ConfigError(
                "device mps: PyTorch cannot use an Apple GPU here ("
                + ("MPS needs Apple silicon and macOS 12.3 or newer" if built
                   else f"this PyTorch {torch.__version__} build has no MPS support")
                + "); use --device cpu or --device auto")
        return self

    def with_dtype(self, stored: torch.dtype | None) -> LoadConfig:
        """This config (device already resolved) with "auto" dtype made concrete.

        `stored` is the checkpoint's float precision (None where its weights are quantized
        blocks with no float type of their own): weights keep it, except that a float32
        checkpoint on a GPU gets the GPU's 16-bit type (vLLM's "auto" does the same: float32
        doubles the memory and halves the speed of a bandwidth-bound decode). Without one, the
        device's default: float32 on the CPU, bfloat16 on CUDA (float16 where the GPU lacks
        it), float16 on MPS. An explicit dtype the device cannot compute in is a ConfigError.
        """
        assert self.device != "auto", "resolve the device first (on_device)"
        on_gpu_as_f32 = stored == torch.float32 and self.device != "cpu"
        name = self.dtype if self.dtype != "auto" else (
            dtype_name(stored) if stored is not None and not on_gpu_as_f32
            else self._device_default())
        _check_dtype_on_device(name, self.device)
        return self.replace(dtype=name)

    def _device_default(self) -> str:
        if self.device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float16" if self.device == "mps" else "float32"


def _has_mps() -> bool:
    return bool(torch.backends.mps.is_available())


def _why(picked: str) -> str:
    if picked == "cuda":
        return torch.cuda.get_device_name(0)
    if picked == "mps":
        return "Apple GPU"
    return "no CUDA or MPS device found"


def _check_cuda(device: str) -> None:
    """A ConfigError unless `device` ("cuda" or "cuda:N") is a GPU PyTorch can use here."""
    if not torch.cuda.is_available():
        build = (f"built for CUDA {torch.version.cuda}, but no GPU or driver is visible"
                 if torch.version.cuda else "a CPU-only build")
        raise ConfigError(f"device {device}: no CUDA GPU is available (PyTorch "
                          f"{torch.__version__} is {build}); use --device cpu or --device auto")
    _, _, index = device.partition(":")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ConfigError(f"device {device}: this machine has {count} CUDA device(s), "
                          f"numbered 0-{count - 1}")


def _check_dtype_on_device(name: str, device: str) -> None:
    """Refuse a weight dtype the device cannot compute in, naming what is missing."""
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype bfloat16: {torch.cuda.get_device_name(0)} has no bfloat16 "
                          "support; use --dtype float16 or float32")
    if name == "bfloat16" and device == "mps":
        try:
            torch.zeros(1, dtype=torch.bfloat16, device="mps")
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"dtype bfloat16 on mps: this macOS/PyTorch cannot compute in "
                              f"bfloat16 on the GPU ({e}); macOS 14 or newer can; use --dtype "
                              f"float16 or float32") from None
