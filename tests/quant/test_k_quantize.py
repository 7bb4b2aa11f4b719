"""K-quant quantizers: llama.cpp's bytes, read back by gguf-py within error bounds, edge cases."""

from __future__ import annotations

import ctypes
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from levante.quant.gguf_blocks import dequantize as levante_dequantize
from levante.quant.k_quantize import F16_SCALE_OFFSETS, K_QUANTIZERS, quantize

Q = GGMLQuantizationType
TYPES = list(K_QUANTIZERS)  # Q2_K .. Q6_K
PEER_LIBS = Path(os.environ.get("LEVANTE_HOME", Path.home() / ".cache" / "levante"), "peers",
                 "llama-cpp", "lib")

# RMS error / RMS value on N(0, 0.02) weights. A uniform grid of step D leaves D / sqrt(12) of
# noise; D is a group's range over its number of steps: Q6_K 16 values (range ~3.5 sigma) over
# 63 steps -> 1.6%; Q5_K 32 values (~4.1 sigma) / 31 -> 3.8%; Q4_K / 15 -> 8%; Q3_K 16 values
# / 7 -> 14.6%; Q2_K / 3 -> 34%. llama.cpp's scale search lands a little below (measured:
# 1.8, 3.6, 7.2, 15.2, 29.6%); the bounds leave ~10% headroom.
RELATIVE_RMS_BOUNDS = {Q.Q6_K: 0.02, Q.Q5_K: 0.04, Q.Q4_K: 0.08, Q.Q3_K: 0.17, Q.Q2_K: 0.33}


def _case(name: str) -> np.ndarray:
    """[rows, 512] float32 test rows by name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = (24, 512)
    cases = {
        "gaussian": lambda: rng.standard_normal(shape) * 0.02,
        "heavy_tails": lambda: rng.standard_t(2, shape),
        "outliers": lambda: rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 40, 1),
        "negative_only": lambda: -np.abs(rng.standard_normal(shape)),
        "positive_offset": lambda: rng.standard_normal(shape) + 3,
        "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "small_integers": lambda: rng.integers(-3, 4, shape).astype(float),
        "zeros": lambda: np.zeros(shape),
        "constant": lambda: np.full(shape, 0.7),
        "negative_constant": lambda: np.full(shape, -0.7),
        "large": lambda: rng.standard_normal(shape) * 1e4,
        "tiny": lambda: rng.standard_normal(shape) * 1e-7,  # f16 scales underflow
        "subnormal": lambda: rng.standard_normal(shape) * 1e-40,
        "mixed_scales": lambda: rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 4, shape),
        "zero_groups": lambda: rng.standard_normal(shape) * (np.arange(512) % 64 >= 16),
    }
    return cases[name]().astype(np.float32)


CASES = ["gaussian", "heavy_tails", "outliers", "negative_only", "positive_offset", "sparse",
         "small_integers", "zeros", "constant", "negative_constant", "large", "tiny",
         "subnormal", "mixed_scales", "zero_groups"]


def _llama_cpp_library() -> ctypes.CDLL | None:
    paths = sorted(PEER_LIBS.glob("python3*/site-packages/llama_cpp/lib/libggml-base.so"))
    return ctypes.CDLL(str(paths[0])) if paths else None


@pytest.fixture(scope="module")
def llama_cpp_quantize() -> Callable[[np.ndarray, Q], np.ndarray]:
    """llama.cpp's `quantize_row_<type>_ref` (no importance matrix) from the peer's ggml."""
    library = _llama_cpp_library()
    if library is None:
        pytest.skip("llama.cpp's ggml library is not built here (benchmarks/peers.py builds it)")

    def run(values: np.ndarray, qtype: Q) -> np.ndarray:
        function = getattr(library, f"quantize_row_{qtype.name[:2].lower()}_K_ref")
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        source = np.ascontiguousarray(values, np.float32)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((source.size // block_size, type_size), np.uint8)
        function(source.ctypes.data, out.ctypes.data, source.size)
        return out.reshape(*values.shape[:-1], -1)

    return run


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", CASES)
def test_bytes_equal_llama_cpp(llama_cpp_quantize: Callable[[np.ndarray, Q], np.ndarray],
                               qtype: Q, case: str) -> None:
    values = _case(case)
    expected = llama_cpp_quantize(values, qtype)
    ours = quantize(values, qtype)
    differing = np.flatnonzero((ours != expected).reshape(-1, GGML_QUANT_SIZES[qtype][1])
                               .any(axis=1))
    assert differing.size == 0, f"{differing.size} blocks differ, first {differing[:5]}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_error_within_bounds(qtype: Q) -> None:
    values = _case("gaussian")
    restored = quants.dequantize(quantize(values, qtype), qtype)  # gguf-py, the reference reader
    error = np.sqrt(np.mean((restored - values) ** 2)) / np.sqrt(np.mean(values ** 2))
    assert error < RELATIVE_RMS_BOUNDS[qtype]
    assert error > RELATIVE_RMS_BOUNDS[qtype] / 3  # the bound is tight, not vacuous


def test_more_bits_less_error() -> None:
    values = _case("gaussian")  # (on heavy tails Q3_K's x^2 weighting can beat Q4_K in RMS)
    errors = [np.sqrt(np.mean((quants.dequantize(quantize(values, t), t) - values) ** 2))
              for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["zeros", "constant", "negative_constant", "negative_only",
                                  "large", "tiny", "zero_groups", "small_integers"])
def test_edge_cases_read_back(qtype: Q, case: str) -> None:
    values = _case(case)
    packed = quantize(values, qtype)
    blocks = packed.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    for offset in F16_SCALE_OFFSETS[qtype]:  # f16 super-block scales are finite
        assert np.isfinite(blocks[:, offset:offset + 2].copy().view(np.float16)).all()
    restored = quants.dequantize(packed, qtype)
    assert restored.shape == values.shape and np.isfinite(restored).all()
    levante = levante_dequantize(torch.from_numpy(packed.reshape(-1)), qtype, values.shape)
    np.testing.assert_array_equal(levante.numpy(), restored)  # both readers agree
    scale = np.sqrt(np.mean(values ** 2))
    error = np.sqrt(np.mean((restored - values) ** 2))
    if case == "zeros":
        assert not restored.any()
    elif case in ("constant", "negative_constant"):  # one value: only f16/6-bit rounding
        assert error < 1e-3 * scale
    elif case == "tiny":  # scales below f16's range round to zero: nothing is invented
        assert error <= scale
    else:
        assert error < RELATIVE_RMS_BOUNDS[qtype] * scale * 1.5


def test_shapes_and_rows_are_kept() -> None:
    values = _case("gaussian").reshape(2, 12, 512)
    packed = quantize(values, Q.Q4_K)
    assert packed.shape == (2, 12, 2 * 144) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed[1, 3], quantize(values[1, 3], Q.Q4_K))


def test_threads_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from levante.quant import k_quantize

    monkeypatch.setattr(k_quantize, "CHUNK_BLOCKS", 5)
    values = _case("outliers")
    assert np.array_equal(quantize(values, Q.Q5_K, num_threads=3), quantize(values, Q.Q5_K))


@pytest.mark.parametrize(("values", "message"), [
    (np.zeros((2, 320), np.float32), "whole 256-value super-blocks"),
    (np.array([[np.nan] + [0.0] * 255], np.float32), "non-finite"),
    (np.array([[np.inf] + [0.0] * 255], np.float32), "non-finite"),
    (np.full((1, 256), 3e38, np.float32) * np.linspace(-1, 1, 256, dtype=np.float32),
     "overflow"),
])
def test_bad_input_is_refused(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(values, Q.Q4_K)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="no K-quant quantizer for Q8_0"):
        quantize(np.zeros((1, 256), np.float32), Q.Q8_0)
