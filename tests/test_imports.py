"""What a process loads to run a GGUF: mistral-common only for a Tekken model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
from levante import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=256)
text = llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0.0))[0].text
print(json.dumps({"text": text, "loaded": sorted(m for m in ("mistral_common", "pydantic",
                  "huggingface_hub", "gguf") if m in sys.modules)}))
"""


def test_a_bpe_gguf_runs_without_mistral_common(smollm2_gguf: Path) -> None:
    """gguf's own vocab module would import mistral-common (with pydantic and huggingface_hub:
    ~30 MB of RSS, ~0.35 s) in every process; Levante loads it only for Tekken models."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_gguf)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"]
    assert result["loaded"] == ["gguf"]


DEQUANTIZED = """
import json, sys
from levante import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=256, quant="none", dtype="bfloat16")
text = llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0.0))[0].text
print(json.dumps({"text": text, "loaded": sorted(m for m in ("torch._dynamo", "sympy")
                                                 if m in sys.modules)}))
"""


def test_a_model_built_on_the_meta_device_imports_no_compiler(smollm2_gguf: Path) -> None:
    """Random init and the rotary table on the meta device would run torch's Python
    references, which import torch._dynamo and sympy (~80 MB of RSS) only to be overwritten
    by the checkpoint's tensors."""
    out = subprocess.run([sys.executable, "-c", DEQUANTIZED, str(smollm2_gguf)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"]
    assert result["loaded"] == []
