"""The memory planner's arithmetic, checked by hand, and its readings of real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from levante.errors import ConfigError
from levante.plan import (
    ACTIVATION_COPIES,
    FIXED_OVERHEAD_BYTES,
    TOKENIZER_BYTES_PER_TOKEN,
    bits_per_weight,
    plan,
)

Q = GGMLQuantizationType
GB = 10**9


def test_bits_per_weight_from_block_layouts() -> None:
    expected = {Q.Q8_0: 8.5, Q.Q4_0: 4.5, Q.Q4_1: 5.0, Q.Q4_K: 4.5, Q.Q5_K: 5.5, Q.Q6_K: 6.5625}
    assert {qtype: bits_per_weight(qtype) for qtype in expected} == expected


def _more_bits_layers(num_layers: int) -> set[int]:
    """llama.cpp's use_more_bits for 40 layers, listed: first/last 5, then every third."""
    return set(range(5)) | set(range(35, 40)) | set(range(7, 35, 3))


def test_mistral_small_3_q4_k_m_at_32k_in_24gb_by_hand() -> None:
    result = plan("mistral-small-3", quant="q4_k_m", context=32768, memory=24 * GB)
    assert _more_bits_layers(40) == {0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34,
                                     35, 36, 37, 38, 39}

    def q4_k(count: int) -> int:  # 144 bytes per 256 values
        return count // 256 * 144

    def q6_k(count: int) -> int:  # 210 bytes per 256 values
        return count // 256 * 210

    dim, q_rows, kv_rows, ffn, vocab = 5120, 32 * 128, 8 * 128, 32768, 131072
    weights = q4_k(vocab * dim) + q6_k(vocab * dim) + (2 * 40 + 1) * dim * 4  # embed, head, norms
    for layer in range(40):
        more = layer in _more_bits_layers(40)
        weights += q4_k(q_rows * dim) + q4_k(kv_rows * dim) + q4_k(dim * q_rows)  # q, k, o
        weights += (q6_k if more else q4_k)(kv_rows * dim)  # v
        weights += 2 * q4_k(ffn * dim) + (q6_k if more else q4_k)(dim * ffn)  # gate, up, down
    assert result.weights_bytes == weights == 14_326_026_240  # the published file: 14.33 GB

    per_token = 40 * 8 * 128 * 2 * 2
    assert result.kv_bytes_per_token == per_token == 163_840
    assert result.kv_cache_bytes == 32768 * per_token
    activations = 512 * (2 * dim + (32 + 2 * 8) * 128 + 2 * ffn) * 4
    assert result.overhead_bytes == (FIXED_OVERHEAD_BYTES + ACTIVATION_COPIES * activations
                                     + vocab * 4 + TOKENIZER_BYTES_PER_TOKEN * vocab)
    assert result.mapped_bytes == 0  # quantized from the preset: no file to map
    total = weights + 32768 * per_token + result.overhead_bytes
    assert result.total_bytes == total and result.fits is (total <= 24 * GB) is True
    room = 24 * GB - weights - result.overhead_bytes
    assert result.max_context == min(32768, room // per_token) == 32768

    too_small = plan("mistral-small-3", quant="q4_k_m", context=32768, memory=16 * GB)
    assert too_small.fits is False
    assert too_small.max_context == (16 * GB - weights - result.overhead_bytes) // per_token


def test_mistral_small_3_rows_next_to_the_post() -> None:
    rows = {row.format: row for row in plan("mistral-small-3").rows}
    assert rows["f16"].post_label == "FP16" and rows["f16"].post_bytes == 48e9
    assert rows["f16"].weights_bytes == 23_572_403_200 * 2
    assert rows["q8_0"].post_label == "8-bit" and rows["q8_0"].weights_bytes == 25_046_896_640
    assert rows["q4_k_m"].post_bytes == 12e9 and 4.8 < rows["q4_k_m"].bits_per_weight < 4.9
    assert rows["q3_k_m"].post_label == "3-bit" and 11.4 * GB < rows["q3_k_m"].weights_bytes \
        < 11.5 * GB
    assert all(row.post_label is None for row in plan("smollm2").rows)


def test_tensor_parallel_splits_weights_and_kv_heads() -> None:
    one = plan("mistral-small-3", quant="q8_0", context=8192)
    two = plan("mistral-small-3", quant="q8_0", context=8192, tensor_parallel=2)
    assert two.weights_bytes == one.weights_bytes // 2
    assert two.kv_bytes_per_token == one.kv_bytes_per_token // 2
    assert one.fits is None and one.max_context is None  # no memory given


def test_gguf_file_counts_its_stored_bytes(smollm2_gguf: Path) -> None:
    from levante.weights.gguf import GGUFFile

    gguf_file = GGUFFile(smollm2_gguf)
    result = plan(str(smollm2_gguf), context=4096, memory=GB)
    assert result.source == "gguf" and result.quant == "q4_1"
    assert result.weights_bytes == sum(gguf_file.nbytes(n) for n in gguf_file.tensor_names)
    assert result.kv_bytes_per_token == 30 * 3 * 64 * 2 * 2
    assert result.fits is True and result.max_context == 8192
    assert plan(str(smollm2_gguf), quant="q8_0").weights_bytes > result.weights_bytes


def test_safetensors_folder_counts_its_dtypes(tiny_mistral_hf: Path) -> None:
    result = plan(str(tiny_mistral_hf))
    assert result.source == "safetensors" and result.quant == "f32"
    assert result.weights_bytes == result.num_params * 4
    # naming the stored format is the folder as stored: the untied embedding stays mapped
    assert result.mapped_bytes == 131072 * 320 * 4
    assert plan(str(tiny_mistral_hf), quant="f32") == result
    assert plan(str(tiny_mistral_hf), quant="bf16").mapped_bytes == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quant": "q2_xs"}, "--quant"), ({"context": 65536}, "exceeds"),
    ({"batch": 0}, "batch"), ({"memory": -1}, "memory")])
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan("mistral-small-3", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kv_cache_dtype", "gib_at_32k"),
                         [("float16", 5.0), ("bfloat16", 5.0), ("float32", 10.0),
                          ("q8_0", 5.0 * 17 / 32)])
def test_planner_and_engine_agree_on_mistral_small_3_kv(kv_cache_dtype: str,
                                                        gib_at_32k: float) -> None:
    """40 layers x 8 KV heads x 128 x K and V: 5 GiB at 32K in 16-bit, and the engine's pool
    (`KVCache.bytes_per_block`, what `--kv-cache-dtype` allocates) counts the same bytes."""
    from levante.config import preset
    from levante.engine.kv_cache import KVCache

    result = plan("mistral-small-3", quant="q4_k_m", context=32768,
                  kv_cache_dtype=kv_cache_dtype)
    assert result.kv_cache_bytes == gib_at_32k * 2**30
    per_block = KVCache.bytes_per_block(preset("mistral-small-3"), 16, kv_cache_dtype)
    assert per_block * (32768 // 16) == result.kv_cache_bytes


def test_unknown_kv_cache_dtype_is_named() -> None:
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be one of"):
        plan("mistral-small-3", kv_cache_dtype="fp4")


@pytest.mark.parametrize("fmt", ["q8_0", "q6_k", "q4_0", "q4_1", "q5_k_m", "q4_k_m", "q3_k_m"])
def test_fallbacks_agree_with_the_writer(fmt: str) -> None:
    """The planner sizes rows that are not whole super-blocks (SmolLM2's 576 values) in the
    type `levante quantize` writes there, which is llama.cpp 0.3.36's (its SmolLM2 Q3_K_M has
    Q4_0 for Q3_K rows)."""
    from levante.config import preset
    from levante.plan import gguf_tensor_type
    from levante.quant.gguf_quantize import export_type
    from levante.weights.layout import expected_shapes

    config = preset("smollm2")
    shapes = {**expected_shapes(config), "lm_head.weight": (config.vocab_size, config.dim)}
    for name, shape in shapes.items():
        if len(shape) == 2:
            planned = gguf_tensor_type(fmt, name, config.num_layers, shape[-1])
            assert planned == export_type(fmt, name, shape, config.num_layers), name


MEASURE_SCRIPT = """
import json, sys
import torch
from levante import LLM, SamplingParams
path, quant, dtype, context = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(2)
llm = LLM(path, max_model_len=context, quant=quant, dtype=dtype)
vocab = llm.bundle.config.vocab_size
prompt = [1000 + (7 * i) % (vocab - 2000) for i in range(context - 2)]  # fills the context
llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
with open("/proc/self/status") as status:
    peak_kib = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
print(json.dumps({"peak": peak_kib * 1024, "quant": llm.bundle.load_config.quant}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize(("quant", "dtype", "planned_as"),
                         [("auto", "auto", None), ("none", "float32", "f32"),
                          ("none", "bfloat16", "bf16")])
def test_plan_equals_measured_peak_rss(smollm2_gguf: Path, quant: str, dtype: str,
                                       planned_as: str | None) -> None:
    """`levante plan` within 10% of the peak RSS of a fresh process whose prompt fills the
    context: the file as stored (Q4_1 blocks), dequantized to float32, and to bfloat16."""
    context = 2048
    out = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, str(smollm2_gguf), quant, dtype,
                          str(context)], check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    predicted = plan(str(smollm2_gguf), quant=planned_as, context=context).total_bytes
    assert abs(predicted - measured["peak"]) <= 0.1 * measured["peak"], (
        f"plan {predicted / 2**20:.0f} MiB, measured {measured['peak'] / 2**20:.0f} MiB")
