"""The weight-only 8-bit Triton kernels (`quant.triton_matmul`): every config of both kernels
through Triton's CPU interpreter where Triton is installed (it is not a dependency: PyTorch's
CUDA wheels bring it), and the tuned kernels on a GPU (`pytest -m gpu`), in layers, inside a
captured CUDA graph and through the engine's decode graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from levante.quant import triton_matmul
from levante.quant.triton_matmul import m_bucket

needs_triton = pytest.mark.skipif(not triton_matmul._has_triton(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Run in a subprocess: TRITON_INTERPRET must be set before the kernels are defined, and a GPU
# run of this file has them compiled already. Interpreter limits: its `tl.dot` mishandles
# bf16 (the GPU tests cover bf16), so activations are f16 here.
INTERPRETER_SCRIPT = r"""
import json, sys
import torch
from levante.quant import triton_kernels as tk
from levante.quant.triton_matmul import cdiv, m_bucket
torch.manual_seed(0)
N, K = 40, 300  # not multiples of any block: every mask is exercised
errors = {}
for name in ("int8", "fp8"):
    weight = torch.randn(N, K)
    if name == "int8":
        codes = (weight * 40).round().clamp(-127, 127).to(torch.int8)
    else:
        codes = (weight * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(N) + 0.5
    reference = codes.float() * scales[:, None]
    for rows in (1, 3, 20):
        x = torch.randn(rows, K).half()
        expected = x.float() @ reference.T
        configs = tk._prune_gemv(tk.GEMV_CONFIGS, {"w_ptr": codes}) if rows == 1 \
            else tk.GEMM_CONFIGS
        for config in configs:
            out = torch.full((rows, N), float("nan"), dtype=torch.half)
            meta = config.kwargs
            if rows == 1:
                tk.gemv[(cdiv(N, meta["BLOCK_N"]),)](x, codes, scales, out, N, K, **meta)
            else:
                grid = (cdiv(rows, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))
                tk.gemm[grid](x, codes, scales, out, rows, N, K, x.stride(0), out.stride(0),
                              m_bucket(rows), **meta)
            error = ((out.float() - expected).norm() / expected.norm()).item()
            errors[f"{name} M={rows} {sorted(meta.items())}"] = error
from levante.quant.linear import Int4Linear
for group in (32, 128):
    K4 = 384 if group == 32 else 768  # not a multiple of any BLOCK_K
    weight4 = torch.randn(N, K4)
    layer = Int4Linear.from_float(weight4, group_size=group, kernel="triton")
    reference = layer.dequantize()  # from the Triton layout: the portable one's weights
    assert torch.equal(reference, Int4Linear.from_float(weight4, group_size=group,
                                                        kernel="dequantize").dequantize())
    packed, sz = layer.packed_0, layer.scales_and_zeros_0
    for rows in (1, 3, 20):
        x = torch.randn(rows, K4).half()
        expected = x.float() @ reference.T
        if rows == 1:
            configs = tk._prune_int4(tk.INT4_GEMV_CONFIGS, {}, GROUP=group)
        else:
            configs = tk._prune_int4(tk.INT4_GEMM_CONFIGS, {}, GROUP=group)  # every BLOCK_M
        for config in configs:
            out = torch.full((rows, N), float("nan"), dtype=torch.half)
            meta = config.kwargs
            if rows == 1:
                tk.int4_gemv[(cdiv(N, meta["BLOCK_N"]),)](x, packed, sz, out, N, K4,
                                                          GROUP=group, **meta)
            else:
                grid = (cdiv(rows, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))
                tk.int4_gemm[grid](x, packed, sz, out, rows, N, K4, x.stride(0),
                                   out.stride(0), m_bucket(rows), GROUP=group, **meta)
            error = ((out.float() - expected).norm() / expected.norm()).item()
            errors[f"int4/{group} M={rows} {sorted(meta.items())}"] = error
# The wrappers (grids, argument order, M buckets, 3-D inputs), each tuner given one config so
# that the interpreter never times one (that needs a GPU).
import triton
from levante.quant import triton_matmul as tm
for name, configs, key in (("gemv", tk.GEMV_CONFIGS, ["N", "K"]),
                           ("gemm", tk.GEMM_CONFIGS, ["M_BUCKET", "N", "K"]),
                           ("int4_gemv", tk.INT4_GEMV_CONFIGS, ["N", "K", "GROUP"]),
                           ("int4_gemm", tk.INT4_GEMM_CONFIGS, ["M_BUCKET", "N", "K", "GROUP"])):
    setattr(tk, f"{name}_tuned", triton.autotune(configs=configs[:1], key=key)(getattr(tk, name)))
codes = (torch.randn(N, K) * 40).round().clamp(-127, 127).to(torch.int8)
scales = torch.rand(N) + 0.5
for rows in (1, 3, 40):
    x = torch.randn(rows, K).half()
    expected = x.float() @ (codes.float() * scales[:, None]).T
    out = tm.row_scaled_matmul(x.view(1, rows, K), codes, scales)
    assert out.shape == (1, rows, N)
    errors[f"wrapper int8 M={rows}"] = ((out[0].float() - expected).norm() / expected.norm()).item()
    x4 = torch.randn(rows, K4).half()
    expected = x4.float() @ reference.T
    out = tm.int4_matmul(x4, packed, sz, group)
    errors[f"wrapper int4 M={rows}"] = ((out.float() - expected).norm() / expected.norm()).item()
for call in (lambda: tm.row_scaled_matmul(torch.randn(1, K + 1).half(), codes, scales),
             lambda: tm.int4_matmul(torch.randn(1, K4 - 2).half(), packed, sz, group)):
    try:
        call()
        raise SystemExit("a width mismatch was not refused")
    except ValueError as e:
        assert "does not match the weight's" in str(e), e
print(json.dumps(errors))
"""


@needs_triton
def test_every_config_matches_the_float_product_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    from levante.quant.triton_kernels import (
        GEMM_SHAPES,
        GEMV_SHAPES,
        INT4_GEMM_SHAPES,
        INT4_GEMV_SHAPES,
    )

    # int8 runs each GEMV shape with and without MAGIC, fp8 without; both run every GEMM config
    assert sum(not key.startswith(("int4", "wrapper")) for key in errors) == \
        3 * len(GEMV_SHAPES) + 2 * 2 * len(GEMM_SHAPES)
    assert sum(key.startswith("int4/32") for key in errors) == \
        2 * len(INT4_GEMV_SHAPES) + 2 * len(INT4_GEMM_SHAPES)  # GEMV with and without ONE_PLUS
    assert any("ONE_PLUS', True" in key for key in errors)
    assert any(key.startswith("int4/128") for key in errors)
    assert sum(key.startswith("wrapper") for key in errors) == 6
    assert any("MAGIC', True" in key for key in errors)
    assert any("SWAP', True" in key for key in errors)
    bad = {key: error for key, error in errors.items() if not error < 2e-3}  # f16 output rounding
    assert not bad


def test_m_buckets() -> None:
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 100, 128, 129, 4096)] == \
        [1, 2, 4, 16, 32, 128, 128, 256, 256]


def test_kernels_are_not_offered_off_cuda_without_the_interpreter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_matmul.available("cpu")
    codes = torch.zeros(8, 16, dtype=torch.int8)
    assert not triton_matmul.takes_codes(codes)


def _codes(fmt: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(3)
    weight = torch.randn(rows, cols, device="cuda", generator=gen)
    if fmt == "int8":
        codes = (weight * 40).round().clamp(-127, 127).to(torch.int8)
    else:
        codes = (weight * 100).clamp(-448, 448).to(torch.float8_e4m3fn)  # past 448 is NaN
    return codes, torch.rand(rows, device="cuda", generator=gen) + 0.5


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tuned_kernels_match_the_float_product_on_cuda(fmt: str) -> None:
    codes, scales = _codes(fmt, 1000, 5120 + 16)  # N and K off every block size
    reference = codes.float() * scales[:, None]
    for rows in (1, 2, 7, 16, 33, 300):
        x = torch.randn(rows, codes.shape[1], device="cuda", dtype=torch.bfloat16)
        out = triton_matmul.row_scaled_matmul(x, codes, scales)
        expected = x.float() @ reference.T
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 1000)
        assert (out.float() - expected).norm() / expected.norm() < 5e-3, rows
    x3 = torch.randn(2, 3, codes.shape[1], device="cuda", dtype=torch.bfloat16)
    assert triton_matmul.row_scaled_matmul(x3, codes, scales).shape == (2, 3, 1000)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("group", [32, 128])
def test_tuned_int4_kernels_match_the_portable_weights_on_cuda(group: int) -> None:
    from levante.quant.linear import Int4Linear

    weight = torch.randn(1000, 5120 + group, device="cuda")  # N and K off every block size
    layer = Int4Linear.from_float(weight, group_size=group)
    assert layer.kernel == "triton"
    reference = layer.dequantize()
    for rows in (1, 2, 7, 16, 33, 300):
        x = torch.randn(rows, weight.shape[1], device="cuda", dtype=torch.bfloat16)
        out = layer(x)
        expected = x.float() @ reference.T
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 1000)
        assert (out.float() - expected).norm() / expected.norm() < 5e-3, rows


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_a_captured_graph_replays_the_kernel() -> None:
    codes, scales = _codes("int8", 512, 1024)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    eager = triton_matmul.row_scaled_matmul(x, codes, scales)  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_matmul.row_scaled_matmul(x, codes, scales)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, triton_matmul.row_scaled_matmul(x, codes, scales))
    assert not torch.equal(captured, eager)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-packed", "fp8"])
def test_quantized_decode_graphs_give_the_eager_tokens(fmt: str) -> None:
    from levante.config import EngineConfig, ModelConfig
    from levante.engine.engine import Engine
    from levante.engine.sampling_params import SamplingParams
    from levante.model import Transformer
    from levante.quant.fp8 import quantize_model_fp8
    from levante.quant.linear import quantize_model
    from tests.engine.test_cuda_graphs import _tokens

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=64, ffn_dim=768, max_seq_len=512)
    model = Transformer(config).to(torch.bfloat16).to("cuda").eval()
    if fmt == "fp8":
        quantize_model_fp8(model)
    else:
        quantize_model(model, fmt.split("-")[0], kernel="packed" if "packed" in fmt else None)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.kernel == {"int8": "triton", "int4": "triton", "int4-packed": "packed",
                            "fp8": "scaled_mm"}[fmt]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[1, 5, 9, 200, 77], [3, 4], list(range(20, 60))]
    tokens = {}
    for mode in ("auto", "off"):
        engine = Engine(model, None, EngineConfig(max_model_len=256, num_kv_blocks=64,
                                                  block_size=16, decode_graphs=mode))
        assert (engine.runner.graphs is not None) == (mode == "auto")
        tokens[mode] = _tokens(engine, prompts, params)
    assert tokens["auto"] == tokens["off"]
    assert all(len(t) == 10 for t in tokens["auto"])
