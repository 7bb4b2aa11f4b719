"""The GPU benchmark script runs end to end on CPU with the preset scaled down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_scaled_down_on_cpu() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--scale", "16", "--device", "cpu",
         "--bandwidth-gbs", "20", "--new-tokens", "4", "--streams", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("bf16 decode, batch 1") and "of bound" in line for line in lines)
    assert any(line.startswith("bf16 TTFT, 500-token prompt") for line in lines)
    assert any(line.startswith("bf16 aggregate, 2 streams") for line in lines)
