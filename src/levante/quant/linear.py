"""Weight-only int8/int4 linears and `quantize_model` (swap each nn.Linear); their checkpoint
form is in `quant.checkpoint`.

Kernels, measured on the development CPU (AMD Zen 5, AVX512-BF16, torch 2.13, batch-1 GEMV,
one thread, best of several interleaved runs): 4096x4096 f32 `F.linear` 5.4 ms,
`_weight_int8pack_mm` 0.95 ms, `_weight_int4pack_mm_for_cpu` 0.85 ms; at SmolLM2's 1536x576
0.060 / 0.025 / 0.026 ms. Both packed kernels are only fast with bf16 activations (f32 in: 4-10x
slower than f32 `F.linear`, f16 in: ~50x), so they run in bf16 and the residual stream stays in
the model's dtype. torchao is not used: its int8 path is only fast under torch.compile and its
default int4 config fails on CPU (shared/NOTES.md). Other devices (MPS; CUDA without
Triton, int8) get the plain-torch "dequantize" kernel: int8 multiplies by its codes in the
activations' dtype and scales each output row after; int4 rebuilds the weight from its
nibbles each call (H200, Mistral Small 3's shape: int8 decoded 5.7 tok/s that way against
bf16's 73.3; `benchmarks/gpu.py`).

On CUDA neither format makes a 16-bit weight per call: both run "triton"
(`quant.triton_matmul`: the codes are converted in registers, 1 or 1/2 byte read per weight;
int4 in the portable layout). Without Triton, int4 runs "packed" through PyTorch's CUDA int4
kernel (`_weight_int4pack_mm`, gpt-fast's tinygemm, bf16 activations), its weight packed once
at construction: faster at batch 1 (H200, one 32768x5120 layer: 84 us, Triton's 115), but
~12 us per token of a prefill (3044 us at 256 tokens, Triton's 611, bf16's 134; a 500-token
prompt's first token 802 ms against 212), so not the default. That kernel's input packing
changed in PyTorch 2.5 (int32 codes -> uint8 pairs); `_cuda_int4_nibble_order` finds the
installed build's order with one small call, checked against the plain-torch result.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant import triton_matmul

log = logging.getLogger(__name__)

FORMATS = ("int8", "int4")
KERNELS = ("packed", "triton", "dequantize")
PACKED_DTYPE = torch.bfloat16  # activation and scale dtype the packed CPU kernels want
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
PACK_ROWS = 4096  # rows packed per call: a multiple of the kernel's 64-row blocks


def default_kernel(device: torch.device | str, fmt: str = "int8") -> str:
    """The fastest kernel for `device` and format: "packed" on CPU; on CUDA "triton" where
    Triton is installed, else "packed" for int4 (where PyTorch's CUDA int4 kernel runs here);
    "dequantize" elsewhere."""
    device = torch.device(device)
    if device.type == "cpu":
        return "packed"
    if device.type == "cuda":
        if triton_matmul.available(device):
            return "triton"
        if fmt == "int4" and _cuda_int4_nibble_order(device) is not None:
            return "packed"
    return "dequantize"


def _check_kernel(kernel: str, device: torch.device, fmt: str) -> None:
    if kernel not in KERNELS:
        raise ConfigError(f"quantized kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "packed" and not (device.type == "cpu" or (fmt == "int4"
                                                            and device.type == "cuda")):
        raise ConfigError(f"the packed {fmt} kernel runs on {'CPU and CUDA' if fmt == 'int4' else 'CPU'}, "
                          f"not {device}; use kernel='dequantize'")
    if kernel == "triton" and not triton_matmul.available(device):
        raise ConfigError(f"the triton kernel runs on CUDA with Triton installed, not on "
                          f"{device}; use kernel='dequantize'")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: [N, K] float -> (int8 codes [N, K], f32 scales [N]).

    scale = max|w_row| / 127, code = round(w / scale) in [-127, 127]; w ~ code * scale.
    """
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: [N, K] -> (uint8 codes 0..15 [N, K], scales, mins [N, K/g]).

    Per group of `group_size` inputs: scale = (max - min) / 15, code = round((w - min) / scale);
    w ~ code * scale + min (the Q4_1 rule, as gpt-fast's group quantizer).
    """
    rows, cols = weight.shape
    if group_size not in INT4_GROUP_SIZES or cols % group_size:
        raise ConfigError(f"int4 group size must be one of {INT4_GROUP_SIZES} and divide the "
                          f"input width {cols}; got {group_size}")
    w = weight.float().reshape(rows, cols // group_size, group_size)
    mins, maxs = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((maxs - mins) / 15).clamp_min(1e-12)
    codes = torch.round((w - mins[..., None]) / scales[..., None]).clamp_(0, 15)
    return codes.to(torch.uint8).reshape(rows, cols), scales, mins


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> [N, K/2] bytes: column 2j in the low nibble, 2j+1 high.

    Example: codes [[1, 2, 15, 0]] -> [[0x21, 0x0F]].
    This is the portable layout Levante writes to disk; CPU kernels get their own packing.
    """
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: [N, K/2] bytes -> uint8 codes [N, K]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _inner_k_tiles(in_features: int) -> int | None:
    """The CUDA int4 layout's K tiling (2, 4 or 8 tiles of 16 inputs) that divides the input
    width, largest first; None where none does."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), None)


def _pack_for_cuda_kernel(codes: torch.Tensor, nibble_order: str) -> torch.Tensor:
    """Codes 0..15 [N, K] on a GPU -> `_weight_int4pack_mm`'s layout; `nibble_order` says
    which nibble of each input byte holds the even column ("high" since PyTorch 2.5)."""
    even, odd = codes[:, 0::2].to(torch.uint8), codes[:, 1::2].to(torch.uint8)
    pairs = (even << 4 | odd) if nibble_order == "high" else (even | odd << 4)
    tiles = _inner_k_tiles(codes.shape[1])
    assert tiles is not None, "checked by Int4Linear"
    packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    return packed


@functools.cache
def _cuda_int4_nibble_order(device: torch.device) -> str | None:
    """"high" or "low" (see `_pack_for_cuda_kernel`) where PyTorch's CUDA int4 kernel runs on
    `device` and gives the plain-torch product for that order; None (logged) where it does not."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        log.info("int4: compute capability < 8.0 has no PyTorch CUDA int4 kernel")
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 128), generator=gen, dtype=torch.uint8)
    x = torch.randn(1, 128, generator=gen).to(PACKED_DTYPE)
    expected = x.float() @ (codes.float() - 8).T  # scale 1, zero 0: w = code - 8
    unit = torch.stack([torch.ones(4, 16), torch.zeros(4, 16)], dim=-1).to(PACKED_DTYPE)
    for order in ("high", "low"):
        try:
            out = torch.ops.aten._weight_int4pack_mm(
                x.to(device), _pack_for_cuda_kernel(codes.to(device), order), 32,
                unit.to(device)).float().cpu()
        except (RuntimeError, NotImplementedError, AttributeError) as e:  # missing op: Attr..
            log.warning("int4: PyTorch's CUDA int4 kernel fails here (%s); weights are "
                        "rebuilt per call instead", e)
            return None
        if (out - expected).norm() <= 1e-2 * expected.norm():
            return order
    log.warning("int4: PyTorch's CUDA int4 kernel matched neither nibble order; weights are "
                "rebuilt per call instead")
    return None


def _pack_for_cpu_kernel(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> `_weight_int4pack_mm_for_cpu`'s layout, PACK_ROWS rows at a time.

    The layout depends on the CPU's vector width but is blocked by output rows, so row
    chunks pack independently (tests check chunked == whole); chunks cap the int32 copy.
    """
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes[start:start + PACK_ROWS].to(torch.int32), 1)
        for start in range(0, codes.shape[0], PACK_ROWS)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_scaled_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (codes * scales[:, None])^T for per-output-row scales, without that product: the
    codes in x's dtype (exact for int8 and float8 codes in bf16), each output column scaled
    after the matmul. 5 bytes of traffic per weight instead of 21 for scaling a float32 copy
    first (H200, one 32768x5120 int8 layer at batch 1: 1291 us that way, bf16's own 106)."""
    return (F.linear(x, codes.to(x.dtype)).float() * scales).to(x.dtype)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied if its data is not 64-byte aligned (tensors read from safetensors often
    are not); `_weight_int8pack_mm` segfaults on such weights from 8 rows of input up."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _linear_2d(x: torch.Tensor, out_features: int,
               fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run `fn` on x flattened to [M, K]; reshape to [..., out_features] in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    out = fn(flat)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """y = x @ (codes * scale)^T with int8 codes [N, K] and one f32 scale per output row."""

    codes: torch.Tensor  # buffers, registered in __init__ (typed here for mypy)
    scales: torch.Tensor
    unit_scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, *,
                 kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kernel = kernel or default_kernel(codes.device, "int8")
        _check_kernel(self.kernel, codes.device, "int8")
        self.register_buffer("codes", _aligned(codes.to(torch.int8).contiguous()))
        self.register_buffer("scales", scales.float().contiguous())
        # the packed kernel multiplies by bf16 scales; we scale in f32 afterwards instead
        self.register_buffer("unit_scales", torch.ones(self.out_features, dtype=PACKED_DTYPE,
                                                       device=codes.device), persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, kernel: str | None = None) -> Int8Linear:
        """Quantize a float weight [N, K] per output channel."""
        codes, scales = quantize_int8(weight)
        return cls(codes, scales, kernel=kernel)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, as float32 [N, K]."""
        return self.codes.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton" and x.dtype in triton_matmul.ACTIVATION_DTYPES:
            return triton_matmul.row_scaled_matmul(x, self.codes, self.scales)
        if self.kernel != "packed":  # "dequantize", or "triton" with float32 activations
            return row_scaled_linear(x, self.codes, self.scales)
        return _linear_2d(x, self.out_features, lambda flat: torch.ops.aten._weight_int8pack_mm(
            flat.to(PACKED_DTYPE), self.codes, self.unit_scales).float() * self.scales)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """Group-wise 4-bit weights: w = sum over planes of (u - 8) * S + Z per group of inputs.

    Codes of up to 4 bits take one plane (u = code, S = scale, Z = offset + 8 * scale).
    Codes of 5-8 bits (Q8_0, Q5_K) split into a high and a low nibble plane, both run by the
    same int4 kernel: w = s * (16h + l) + o = [(h - 8) * 16s + 128s] + [(l - 8) * s + 8s + o].
    Example: Q8_0 code 200 = 16 * 12 + 8, d = 0.5, o = -64 -> 96 + 4 - 64 = 36 = (200 - 128) * 0.5.
    S and Z are stored in bf16 (the CPU kernel takes them in the activation dtype).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, *,
                 bits: int = 4, kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scales.shape[1]
        if (self.group_size not in INT4_GROUP_SIZES
                or self.group_size * scales.shape[1] != self.in_features):
            raise ConfigError(f"int4 groups of {self.in_features}/{scales.shape[1]} inputs are "
                              f"not supported; group size must be one of {INT4_GROUP_SIZES}")
        if not 1 <= bits <= 8:
            raise ConfigError(f"Int4Linear holds codes of 1 to 8 bits, not {bits}")
        self.kernel = kernel or default_kernel(codes.device, "int4")
        _check_kernel(self.kernel, codes.device, "int4")
        self.nibble_order = None
        if self.kernel == "packed" and codes.device.type == "cuda":
            self.nibble_order = _cuda_int4_nibble_order(codes.device)
            problem = ("PyTorch's CUDA int4 kernel does not run here" if self.nibble_order is None
                       else None if _inner_k_tiles(self.in_features) and self.out_features % 8 == 0
                       else f"its CUDA layout needs N % 8 == 0 and K % 32 == 0, not "
                            f"{self.out_features}x{self.in_features}")
            if problem and kernel is not None:
                raise ConfigError(f"int4 kernel 'packed': {problem}; use kernel='dequantize'")
            if problem:
                self.kernel = "dequantize"
        scales, offsets = scales.float(), offsets.float()
        if bits <= 4:
            planes = [(codes, scales, offsets + 8 * scales)]
        else:
            planes = [(codes >> 4, 16 * scales, 128 * scales),
                      (codes & 0x0F, scales, offsets + 8 * scales)]
        self.num_planes = len(planes)
        for index, (plane, plane_scales, zeros) in enumerate(planes):
            self._add_plane(index, plane, plane_scales, zeros)

    def _add_plane(self, index: int, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor) -> None:
        # weights: pack_nibbles, or packed for PyTorch's kernel; scales_and_zeros [K/g, N, 2]
        # as PyTorch's int4 kernels take them, [2, N, K/g] for Triton (rows read contiguously)
        if self.kernel != "packed":  # "dequantize" and "triton" read the portable layout
            packed = pack_nibbles(codes)
        elif self.nibble_order is not None:
            packed = _pack_for_cuda_kernel(codes, self.nibble_order)
        else:
            packed = _pack_for_cpu_kernel(codes)
        if self.kernel == "triton":  # [2, N, K/g]: a row's scales, then its zeros, side by side
            scales_and_zeros = torch.stack([scales, zeros]).to(PACKED_DTYPE)
        else:
            scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(PACKED_DTYPE)
        self.register_buffer(f"packed_{index}", packed.contiguous())
        self.register_buffer(f"scales_and_zeros_{index}", scales_and_zeros.contiguous())

    def _plane(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"packed_{index}"), getattr(self, f"scales_and_zeros_{index}")

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, group_size: int = 32,
                   kernel: str | None = None) -> Int4Linear:
        """Quantize a float weight [N, K] group-wise (see `quantize_int4`)."""
        codes, scales, mins = quantize_int4(weight, group_size)
        return cls(codes, scales, mins, kernel=kernel)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [N, K]; only the portable ("dequantize" kernel) layout."""
        if self.kernel == "packed":
            raise ConfigError("Int4Linear.dequantize needs kernel 'dequantize' or 'triton': the "
                              "packed layouts are private to PyTorch's kernels")
        weight = torch.zeros(self.out_features, self.in_features,
                             device=self._plane(0)[0].device)
        for index in range(self.num_planes):
            packed, scales_and_zeros = self._plane(index)
            groups = unpack_nibbles(packed).float().view(self.out_features, -1, self.group_size)
            if self.kernel == "triton":
                scales, zeros = (part.float()[..., None] for part in scales_and_zeros)
            else:
                scales = scales_and_zeros[..., 0].t().float()[..., None]  # [N, K/g, 1]
                zeros = scales_and_zeros[..., 1].t().float()[..., None]
            weight += ((groups - 8) * scales + zeros).view_as(weight)
        return weight

    def _packed_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(PACKED_DTYPE)
        out = None
        for index in range(self.num_planes):
            packed, scales_and_zeros = self._plane(index)
            matmul = (torch.ops.aten._weight_int4pack_mm_for_cpu if flat.device.type == "cpu"
                      else torch.ops.aten._weight_int4pack_mm)
            part: torch.Tensor = matmul(flat, packed, self.group_size, scales_and_zeros).float()
            out = part if out is None else out.add_(part)
        assert out is not None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton" and x.dtype in triton_matmul.ACTIVATION_DTYPES:
            out = None
            for index in range(self.num_planes):
                part = triton_matmul.int4_matmul(x, *self._plane(index), self.group_size)
                out = part if out is None else out + part
            assert out is not None
            return out
        if self.kernel != "packed":  # "dequantize", or "triton" with float32 activations
            return F.linear(x, self.dequantize().to(x.dtype))
        return _linear_2d(x, self.out_features, self._packed_matmul)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"planes={self.num_planes}, kernel={self.kernel}")


def quantize_model(model: Transformer, fmt: str, *, group_size: int = 32,
                   kernel: str | None = None) -> Transformer:
    """Swap every nn.Linear of `model` for an int8 or int4 one, in place; returns `model`.

    Norms and the embedding stay in float: they are a small share of the bytes and an
    embedding lookup reads one row per token. The output head is quantized too (it is the
    largest single matmul per token); under "int4" it gets int8, as llama.cpp keeps the output
    at 6-8 bits. A tied head gets its own quantized copy while the embedding stays float.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    if not targets:
        raise ConfigError(f"the model has no float linear layers to quantize to {fmt} (is it "
                          f"already quantized, e.g. a GGUF kept in its own blocks?)")
    for name, module in targets:
        weight = module.weight.detach()
        if fmt == "int8" or name == "lm_head":
            # the int4 model's int8 head: PyTorch's packed int8 kernel is CPU-only
            head_kernel = None if kernel == "packed" and weight.device.type != "cpu" else kernel
            new: nn.Module = Int8Linear.from_float(weight, kernel=head_kernel)
        else:
            new = Int4Linear.from_float(weight, group_size=group_size, kernel=kernel)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    log.info("quantized %d linear layers to %s", len(targets), fmt)
    return model
