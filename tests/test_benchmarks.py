"""Benchmark scripts run end to end, scaled down: the GPU one on CPU, the feature one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_scaled_down_on_cpu() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--scale", "16", "--device", "cpu",
         "--bandwidth-gbs", "20", "--new-tokens", "4", "--streams", "2"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("bf16 decode, batch 1") and "of bound" in line for line in lines)
    assert any(line.startswith("bf16 TTFT, 500-token prompt") for line in lines)
    assert any(line.startswith("bf16 aggregate, 2 streams") for line in lines)
    # bf16 on CPU: the gather path (the kernel is float32), and no graphs off CUDA
    assert "attention: sdpa; decode steps: eager" in lines
    assert any(line.startswith("decode graphs vs eager, batch 1") for line in lines)
    assert any(line.startswith("flex vs sdpa, 2 streams") and ": flex " in line for line in lines)
    assert any(line.startswith("fp8 decode, batch 1 (dequantize)") and "of bound" in line
               for line in lines)


def load_features() -> ModuleType:
    """benchmarks/features.py as a module (benchmarks/ is not a package)."""
    name = "benchmarks_features"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "features.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_features_script_runs_scaled_down(smollm2_gguf: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "features.py"), "--rounds", "1",
         "--turns", "2", "--answer-tokens", "4", "--new-tokens", "24", "--spec-tokens", "3"],
        check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    turns = {cells[0]: cells for cells in lines
             if len(cells) == 6 and cells[0] in ("1", "2") and cells[2].endswith("%")}
    # Turn 2 repeats turn 1's prompt and answer: all but its last partial block is cached.
    assert turns["1"][2] == "0%"
    assert int(turns["2"][2].rstrip("%")) >= 80
    # Repeating a paragraph: most prompt-lookup drafts are accepted (row after "repeat ... 0").
    repeat = next(i for i, cells in enumerate(lines) if cells[:1] == ["repeat"])
    assert lines[repeat + 1][0] == "3"
    assert int(lines[repeat + 1][3].rstrip("%")) >= 50
    assert "greedy outputs on = off in" in result.stdout
    assert "greedy outputs equal k=0's first in" in result.stdout


def test_features_divergence_check_tells_near_ties_from_real_differences(
        smollm2_gguf: Path) -> None:
    from levante import LLM, SamplingParams

    features = load_features()
    llm = LLM("smollm2", quant="gguf", max_model_len=512)
    prompt = llm.encode_chat([{"role": "user", "content": "Name a colour."}])
    expected = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    # Rescore token 1 as `divergence` does (a prefill of the prompt and token 0).
    rescored = llm.generate(prompt + expected[:1],
                            SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    top = dict(rescored.top_logprobs[0])
    second = next(t for t in top if t != expected[1])
    gap = abs(top[expected[1]] - top[second])
    near_miss = expected[:1] + [second, expected[2]]
    assert features.divergence(llm.engine, prompt, expected, expected, 0.5) is None
    assert "near-tie" in features.divergence(llm.engine, prompt, expected, near_miss, gap + 0.01)
    with pytest.raises(AssertionError, match="not a near-tie"):
        features.divergence(llm.engine, prompt, expected, near_miss, gap - 0.01)
    unlikely = next(t for t in range(1000, 2000) if t not in top)
    with pytest.raises(AssertionError, match="top 5"):
        features.divergence(llm.engine, prompt, expected, expected[:1] + [unlikely], 10.0)


@pytest.mark.slow
def test_ray_replicas_script_runs_scaled_down(tmp_path: Path) -> None:
    """One process vs 2 Ray Serve replicas vs the front, 1 client, 2 tokens (~1 min)."""
    pytest.importorskip("ray.serve")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ray_replicas.py"), "--clients", "1",
         "--max-tokens", "2", "--requests-per-client", "1", "--latency-rounds", "8",
         "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for setup in ("one", "ray", "front"):
        assert any(line.split()[:2] == ["1", setup] for line in result.stdout.splitlines())
    added = [line for line in result.stdout.splitlines() if "added p50" in line]
    for probe, setup in (("GET /v1/models", "ray"), ("POST 1 token", "ray"),
                         ("GET /v1/models", "front")):
        assert any(line.startswith(probe) and f" {setup}: " in line for line in added), added
