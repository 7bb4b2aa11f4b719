"""int8/int4 linears against plain-torch reference quantizers and dequantize-then-matmul."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from levante.config import ModelConfig
from levante.errors import ConfigError, ModelFileError
from levante.model import Transformer
from levante.quant import linear
from levante.quant.checkpoint import (
    QUANT_METADATA_KEY,
    load_quantized_checkpoint,
    quantized_tensors,
    read_quant_metadata,
)
from levante.quant.gguf_linear import model_nbytes
from levante.quant.linear import (
    Int4Linear,
    Int8Linear,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_nibbles,
)
from levante.weights.layout import expected_shapes

BF16_RTOL = 2e-2  # packed kernels take bf16 activations, scales and outputs


def reference_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8, written out: scale = max|row| / 127, q = round(w / scale)."""
    codes = torch.empty_like(w, dtype=torch.int8)
    scales = torch.empty(w.shape[0])
    for row in range(w.shape[0]):
        scale = w[row].abs().max() / 127
        scales[row] = scale
        codes[row] = torch.round(w[row] / scale).clamp(-127, 127).to(torch.int8)
    return codes, scales


def reference_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit, one group at a time: w ~ code * (max-min)/15 + min."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group)
    mins = torch.empty(rows, cols // group)
    for row in range(rows):
        for g in range(cols // group):
            values = w[row, g * group:(g + 1) * group]
            low, high = values.min(), values.max()
            scale = (high - low) / 15
            scales[row, g], mins[row, g] = scale, low
            codes[row, g * group:(g + 1) * group] = torch.round((values - low) / scale).clamp(
                0, 15).to(torch.uint8)
    return codes, scales, mins


def _weight(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_int8_quantizer_matches_reference() -> None:
    w = _weight()
    codes, scales = quantize_int8(w)
    ref_codes, ref_scales = reference_int8(w)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    assert (codes.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6


@pytest.mark.parametrize("group", [32, 64])
def test_int4_quantizer_matches_reference(group: int) -> None:
    w = _weight()
    codes, scales, mins = quantize_int4(w, group)
    ref_codes, ref_scales, ref_mins = reference_int4(w, group)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    assert torch.equal(mins, ref_mins)
    # round-half cases may differ by one code where the divisions round differently
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 1e-3
    error = (codes.float().view(64, -1, group) * scales[..., None] + mins[..., None]).view_as(w) - w
    assert error.abs().max() <= scales.max() / 2 + 1e-5


def test_int4_rejects_bad_group() -> None:
    with pytest.raises(ConfigError, match="group size"):
        quantize_int4(_weight(), 48)


def test_nibble_packing_example_and_round_trip() -> None:
    assert pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


@pytest.mark.parametrize("kernel", ["packed", "dequantize"])
@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 5, 128)])
def test_int8_linear_equals_dequantize_then_matmul(kernel: str, shape: tuple[int, ...]) -> None:
    w = _weight()
    layer = Int8Linear.from_float(w, kernel=kernel)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, layer.dequantize())
    out = layer(x)
    assert out.shape == (*shape[:-1], 64) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=BF16_RTOL, atol=BF16_RTOL * expected.abs().max())


def _kernel_reference(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """The weight the int4 kernel computes with: planes with bf16-rounded S and Z."""
    group = codes.shape[1] // scales.shape[1]

    def plane(u: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s, z = s.bfloat16().float()[..., None], z.bfloat16().float()[..., None]
        return ((u.float().view(u.shape[0], -1, group) - 8) * s + z).view(u.shape)

    if bits <= 4:
        return plane(codes, scales, offsets + 8 * scales)
    return plane(codes >> 4, 16 * scales, 128 * scales) + plane(codes & 15, scales,
                                                                 offsets + 8 * scales)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("kernel", ["packed", "dequantize"])
def test_int4_linear_equals_dequantize_then_matmul(bits: int, kernel: str) -> None:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2**bits, (80, 128), dtype=torch.uint8, generator=gen)
    scales, offsets = torch.rand(80, 4, generator=gen) * 0.1, torch.randn(80, 4, generator=gen)
    layer = Int4Linear(codes, scales, offsets, bits=bits, kernel=kernel)
    assert layer.num_planes == (1 if bits <= 4 else 2)
    weight = _kernel_reference(codes, scales, offsets, bits)
    exact = (codes.float().view(80, 4, 32) * scales[..., None] + offsets[..., None]).view(80, 128)
    torch.testing.assert_close(weight, exact, rtol=1e-2, atol=2 ** bits * scales.max() * 2 ** -7)
    x = torch.randn(3, 128, generator=gen)
    expected = F.linear(x, weight)
    torch.testing.assert_close(layer(x), expected, rtol=BF16_RTOL,
                               atol=BF16_RTOL * expected.abs().max())
    if kernel == "dequantize":
        torch.testing.assert_close(layer.dequantize(), weight)


def test_cpu_packing_in_row_chunks_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    codes = torch.randint(0, 16, (208, 64), dtype=torch.uint8)
    whole = linear._pack_for_cpu_kernel(codes)
    monkeypatch.setattr(linear, "PACK_ROWS", 64)
    assert torch.equal(linear._pack_for_cpu_kernel(codes), whole)


def _tiny_config(**changes: object) -> ModelConfig:
    base = {"vocab_size": 256, "dim": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
            "head_dim": 64, "ffn_dim": 512, "max_seq_len": 64, "tie_embeddings": False}
    return ModelConfig(**{**base, **changes})  # type: ignore[arg-type]


def _tiny_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).to(dtype).eval()
    for module in model.modules():  # weights of a trained model's scale, not init's 1/sqrt(fan)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_model_swaps_linears_and_stays_close(fmt: str) -> None:
    config = _tiny_config(tie_embeddings=True)
    model = _tiny_model(config)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model.logits(model(ids))
        quantize_model(model, fmt)
        out = model.logits(model(ids))
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(layers) == 2 * 7 + 1 and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    cosine = F.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    assert cosine > (0.999 if fmt == "int8" else 0.95)  # 4 bits on Gaussian weights: ~8% noise


def test_quantize_model_rejects_unknown_format_and_nothing_to_do() -> None:
    model = _tiny_model(_tiny_config())
    with pytest.raises(ConfigError, match="int8"):
        quantize_model(model, "int3")
    quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "int4")


def test_int8_model_takes_about_half_the_bytes_of_bf16() -> None:
    config = _tiny_config(vocab_size=64, dim=512, ffn_dim=2048, num_layers=4, num_heads=8,
                          num_kv_heads=8)  # linears: 97% of the weights
    bf16 = _tiny_model(config, torch.bfloat16)
    bf16_bytes = model_nbytes(bf16)
    int8_bytes = model_nbytes(quantize_model(bf16, "int8"))
    assert 0.48 < int8_bytes / bf16_bytes < 0.56


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_checkpoint_round_trip_equals_quantize_model(tmp_path: Path, fmt: str) -> None:
    config = _tiny_config()
    model = _tiny_model(config)
    state = {name: t for name, t in model.state_dict().items()}
    stored: dict[str, torch.Tensor] = {}
    for name in expected_shapes(config):
        stored.update(quantized_tensors(fmt, name, state[name]))
    path = tmp_path / "model.safetensors"
    save_file(stored, path, metadata={QUANT_METADATA_KEY: json.dumps(
        {"version": 1, "format": fmt, "group_size": 32})})
    assert read_quant_metadata(path) == {"version": 1, "format": fmt, "group_size": 32}
    loaded = load_quantized_checkpoint([path], config, torch.float32)
    model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.bfloat16().float()
    quantize_model(model, fmt)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    tolerance = 2e-3 if fmt == "int8" else 3e-2  # int4 files keep scales and mins in f16
    with torch.inference_mode():
        torch.testing.assert_close(loaded.logits(loaded(ids)), model.logits(model(ids)),
                                   rtol=tolerance, atol=tolerance)


def test_checkpoint_metadata_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    assert read_quant_metadata(plain) is None
    bad = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(2)}, bad, metadata={QUANT_METADATA_KEY: '{"format": "int3"}'})
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        read_quant_metadata(bad)
    config = _tiny_config()
    missing = tmp_path / "missing.safetensors"
    save_file({"model.norm.weight": torch.ones(256)}, missing)
    with pytest.raises(ModelFileError, match="missing tensor"):
        load_quantized_checkpoint([missing], config, torch.float32)
