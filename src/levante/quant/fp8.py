"""FP8 (e4m3) weight linears with one float32 scale per output channel, and `quantize_model_fp8`.

Why 8-bit on a GPU: batch-1 decode reads every weight once per token, so its bound is memory
bandwidth over weight bytes. Mistral Small 3 in bf16 is ~47 GB: 4.8 TB/s / 47 GB = ~100 tok/s
on an H200; fp8 halves the bytes. Which kernel computes (`Fp8Linear.kernel`):

- "scaled_mm" (CUDA, compute capability >= 8.9: Ada, Hopper): each call quantizes its input to
  fp8 per token (dynamic scales, amax / 448, as vLLM's fp8 W8A8 "dynamic per-token") and runs
  `torch._scaled_mm` with row-wise scales (activations [M, 1], weights [1, N]), bf16 out. This
  is the only path here that reads 1 byte per weight: the weight-only alternative in eager
  PyTorch (upcast the fp8 matrix, then a bf16 matmul) reads 1 byte, writes 2 and reads 2 again
  per weight and call, 2.5x the traffic of plain bf16, so it could never beat bf16 at batch 1.
  `_scaled_mm` accepts M = 1 (only K and N must be multiples of 16), so batch-1 decode runs
  on it. Row-wise scales are a CUTLASS kernel on Hopper; PyTorch builds have refused them on
  Ada (sm89, where that kernel was sm90-only) and on consumer Blackwell (sm_120, cuBLAS "not
  supported", pytorch#192707), so `default_kernel` runs one tiny call first and a GPU that
  refuses it falls back to "dequantize" with a warning naming the error. At M = 1 that kernel
  moved 659 GB/s on an H200 (254 us for a 32768x5120 layer, bf16's `F.linear` 106 us), so calls
  of up to `TRITON_MAX_ROWS` tokens (decode) read the fp8 codes weight-only through
  `quant.triton_matmul` instead: 1 byte per weight, no activation quantization.
- "dequantize" (everywhere else: CPU, older GPUs): weight-only, upcast the fp8 codes to the
  activations' dtype per call, `F.linear`, then scale the outputs per channel (exact: the
  scale is per output row). Correct, not fast; deterministic on the CPU.
- MPS has no float8 dtypes: `check_device` refuses it by name.

Embedding and output head stay in the model dtype, as vLLM's fp8 weight quantization keeps
`lm_head` unquantized by default: the head is one matmul whose errors go straight into the
logits, and the embedding is a row lookup, not a matmul.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant import triton_matmul
from levante.quant.linear import row_scaled_linear

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0, the largest finite e4m3fn value
KERNELS = ("scaled_mm", "dequantize")
QUANTIZE_ROWS = 4096  # rows quantized at a time: bounds the float32 temporary
MIN_SCALE = 1e-12  # an all-zero row or token gets this scale, not a division by zero
SCALED_MM_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
TRITON_MAX_ROWS = 16  # "scaled_mm" layers run calls of up to this many tokens weight-only in Triton


def check_device(device: torch.device | str) -> None:
    """A ConfigError where `device` cannot hold float8 tensors (Apple's MPS)."""
    if torch.device(device).type == "mps":
        raise ConfigError("--quant fp8: PyTorch's MPS backend (Apple GPUs) has no float8 dtypes; "
                          "use --quant int8 or int4 there, or --device cpu")


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 e4m3: [N, K] float -> (float8_e4m3fn codes [N, K], f32 scales [N]).

    scale = max|w_row| / 448; code = w / scale rounded to nearest (even) e4m3, saturated at
    +-448 by an explicit clamp (e4m3fn has no infinity: past 448 is NaN or saturation,
    depending on the cast's implementation); w ~ code * scale. Rows go
    `QUANTIZE_ROWS` at a time on the weight's own device, so the float32 temporary stays small.
    Example: row [0.5, -1.0, 0.01] -> scale 1/448, codes [224, -448, 4.48 -> 4.5].
    """
    codes = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = weight[start:start + QUANTIZE_ROWS].float()
        row_scales = rows.abs().amax(dim=1).clamp_min(MIN_SCALE * FP8_MAX) / FP8_MAX
        codes[start:start + QUANTIZE_ROWS] = (rows / row_scales[:, None]).clamp_(-FP8_MAX, FP8_MAX)
        scales[start:start + QUANTIZE_ROWS] = row_scales
    return codes, scales


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (fp8 codes [M, K], f32 scales [M, 1]): one scale per token."""
    flat = x.float()
    scales = flat.abs().amax(dim=1, keepdim=True).clamp_min(MIN_SCALE * FP8_MAX) / FP8_MAX
    return (flat / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def default_kernel(device: torch.device | str) -> str:
    """"scaled_mm" on a CUDA GPU with fp8 tensor cores where a tiny call works, else
    "dequantize"; logs the reason for the choice."""
    device = torch.device(device)
    check_device(device)
    if device.type != "cuda":
        return "dequantize"
    capability = torch.cuda.get_device_capability(device)
    if capability < SCALED_MM_MIN_CAPABILITY:
        log.info("fp8: compute capability %d.%d < 8.9 has no fp8 matmul; weights are upcast "
                 "per call (weight-only, no faster than bf16)", *capability)
        return "dequantize"
    try:
        probe = torch.ones(16, 16, device=device).to(FP8_DTYPE)
        _scaled_matmul(torch.ones(1, 16, device=device, dtype=torch.bfloat16), probe,
                       torch.ones(16, device=device))
    except (RuntimeError, NotImplementedError) as e:
        log.warning("fp8: torch._scaled_mm with row-wise scales fails on %s (%s); weights are "
                    "upcast per call instead (weight-only, no faster than bf16)",
                    torch.cuda.get_device_name(device), e)
        return "dequantize"
    return "scaled_mm"


def _scaled_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] * scales [N])^T with fp8 activations per token, bf16 out [M, N]."""
    x_codes, x_scales = quantize_per_token(x)
    # codes.t() is [K, N] column-major, the layout _scaled_mm wants for its second operand
    return torch._scaled_mm(x_codes, codes.t(), scale_a=x_scales, scale_b=scales[None, :],
                            out_dtype=torch.bfloat16)


class Fp8Linear(nn.Module):
    """y = x @ (codes * scale)^T, float8_e4m3fn codes [N, K], one f32 scale per output row."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, *,
                 kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kernel = kernel or default_kernel(codes.device)
        if self.kernel not in KERNELS:
            raise ConfigError(f"fp8 kernel must be one of {KERNELS}, got {self.kernel!r}")
        if codes.dtype != FP8_DTYPE or scales.shape != (self.out_features,):
            raise ConfigError(f"Fp8Linear takes {FP8_DTYPE} codes [N, K] and scales [N], got "
                              f"{codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}")
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.float())
        # decode-sized calls of a "scaled_mm" layer read the codes weight-only in Triton
        self.triton_decode = self.kernel == "scaled_mm" and triton_matmul.takes_codes(codes)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, kernel: str | None = None) -> Fp8Linear:
        """Quantize a float weight [N, K] per output channel (`quantize_fp8`)."""
        codes, scales = quantize_fp8(weight)
        return cls(codes, scales, kernel=kernel)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer stands for, as float32 [N, K]."""
        return self.codes.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequantize":  # the per-row scale commutes with the matmul
            return row_scaled_linear(x, self.codes, self.scales)
        flat = x.reshape(-1, self.in_features)  # [..., K] -> [M, K]
        if (self.triton_decode and flat.shape[0] <= TRITON_MAX_ROWS
                and x.dtype in triton_matmul.ACTIVATION_DTYPES):
            return triton_matmul.row_scaled_matmul(x, self.codes, self.scales)
        out = _scaled_matmul(flat, self.codes, self.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def concat(cls, parts: Sequence[nn.Module]) -> Fp8Linear | None:
        """The parts stacked by output rows (`model.RowConcatenable`); they become views."""
        layers = [p for p in parts if isinstance(p, Fp8Linear)]
        if len(layers) != len(parts) or len({(p.kernel, p.in_features) for p in layers}) != 1:
            return None
        codes = torch.cat([p.codes.view(torch.uint8) for p in layers]).view(FP8_DTYPE)
        joined = cls(codes, torch.cat([p.scales for p in layers]), kernel=layers[0].kernel)
        start = 0
        for part in layers:
            end = start + part.out_features
            part.codes, part.scales = joined.codes[start:end], joined.scales[start:end]
            start = end
        return joined

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def quantize_model_fp8(model: Transformer, *, device: torch.device | str | None = None,
                       kernel: str | None = None) -> Transformer:
    """Every decoder-layer nn.Linear of `model` to `Fp8Linear`, in place, one at a time.

    Each float weight is moved to `device` (default: where it is), quantized there, and its
    float copy dropped before the next, so a model built on the CPU (weights in the
    checkpoint's memory map) reaches a GPU at about its fp8 size. The output head, embedding
    and norms stay in the model dtype and move with `model.to(device)` afterwards.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name != "lm_head"]
    if not targets:
        raise ConfigError("the model has no float linear layers to quantize to fp8 (is it "
                          "already quantized, e.g. a GGUF kept in its own blocks?)")
    where = torch.device(device) if device is not None else targets[0][1].weight.device
    kernel = kernel or default_kernel(where)
    num_upcast = 0
    for name, module in targets:
        layer_kernel = kernel if module.in_features % 16 == 0 and module.out_features % 16 == 0 \
            else "dequantize"  # _scaled_mm needs K and N to be multiples of 16
        num_upcast += layer_kernel != kernel
        new = Fp8Linear.from_float(module.weight.detach().to(where), kernel=layer_kernel)
        model.set_submodule(name, new)
    log.info("fp8: %d linears to float8_e4m3fn with per-channel scales on %s, kernel %s "
             "(%s)%s; embedding and lm_head stay %s", len(targets), where, kernel,
             "fp8 activations per token, torch._scaled_mm" if kernel == "scaled_mm" else
             "weight-only, upcast per call: correct, not fast",
             f", {num_upcast} upcast per call (a width not a multiple of 16)" if num_upcast
             else "", model.lm_head.weight.dtype)
    return model
