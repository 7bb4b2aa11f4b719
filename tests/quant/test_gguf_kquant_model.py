"""A whole model in Q4_K_M / Q3_K_M-style K-quant mixes: loaded from its blocks by default."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFValueType

from levante import LLM, SamplingParams
from levante.bundle import load
from levante.errors import ModelFileError
from levante.quant import kernels
from levante.quant.gguf_linear import KQuantLinear, kernel_summary
from levante.quant.k_quantize import quantize

Q = GGMLQuantizationType
VT = GGUFValueType
TOKENS = [chr(c) for c in range(ord("A"), ord("A") + 60)] + ["AB", "<s>", "</s>", "<unk>"]
DIM, FFN, HEAD_DIM, HEADS, KV_HEADS, LAYERS = 256, 512, 128, 2, 1, 2
# llama.cpp's Q4_K_M: Q6_K for the output and some attn_v/ffn_down; Q3_K_M: Q3_K for most,
# Q4_K/Q5_K for attn_output/attn_v/ffn_down. Both mixes in one file, layer by layer.
MIXES = {
    "q4_k_m": {"output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K,
               "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K,
               "token_embd": Q.Q4_K},
    "q3_k_m": {"output": Q.Q6_K, "attn_q": Q.Q3_K, "attn_k": Q.Q3_K, "attn_v": Q.Q5_K,
               "attn_output": Q.Q4_K, "ffn_gate": Q.Q3_K, "ffn_up": Q.Q3_K, "ffn_down": Q.Q4_K,
               "token_embd": Q.Q3_K},
}


def tensors() -> dict[str, np.ndarray]:
    """A 2-layer llama with K-quant-sized rows (dim 256, head_dim 128, 2:1 GQA), untied."""
    vocab = len(TOKENS)
    shapes = {"token_embd.weight": (vocab, DIM), "output.weight": (vocab, DIM),
              "output_norm.weight": (DIM,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
                   f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, DIM),
                   f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, DIM),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, DIM),
                   f"blk.{i}.attn_output.weight": (DIM, HEADS * HEAD_DIM),
                   f"blk.{i}.ffn_gate.weight": (FFN, DIM), f"blk.{i}.ffn_up.weight": (FFN, DIM),
                   f"blk.{i}.ffn_down.weight": (DIM, FFN)}
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        scale = 1.0 if name.endswith("norm.weight") else 0.06
        out[name] = (rng.standard_normal(shape) * scale + (name.endswith("norm.weight"))
                     ).astype(np.float32)
    return out


def write(path: Path, types: dict[str, GGMLQuantizationType]) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value, value_type in (
            ("llama.context_length", 256, VT.UINT32), ("llama.embedding_length", DIM, VT.UINT32),
            ("llama.block_count", LAYERS, VT.UINT32),
            ("llama.feed_forward_length", FFN, VT.UINT32),
            ("llama.attention.head_count", HEADS, VT.UINT32),
            ("llama.attention.head_count_kv", KV_HEADS, VT.UINT32),
            ("llama.attention.key_length", HEAD_DIM, VT.UINT32),
            ("llama.attention.value_length", HEAD_DIM, VT.UINT32),
            ("llama.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32),
            ("llama.rope.freq_base", 1e6, VT.FLOAT32),
            ("tokenizer.ggml.model", "gpt2", VT.STRING),
            ("tokenizer.ggml.pre", "gpt2", VT.STRING),
            ("tokenizer.ggml.bos_token_id", 61, VT.UINT32),
            ("tokenizer.ggml.eos_token_id", 62, VT.UINT32)):
        writer.add_key_value(key, value, value_type)
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", [1] * 61 + [3] * 3)
    writer.add_array("tokenizer.ggml.merges", ["A B"])
    for name, array in tensors().items():
        role = name.split(".")[-2]
        qtype = types.get(role) if array.ndim == 2 else None
        if qtype is None:
            writer.add_tensor(name, array)
        elif qtype == Q.IQ2_XS:  # a type Levante has no dequantizer for: any bytes will do
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((array.shape[0], array.shape[1] // block_size * type_size), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=list(MIXES))
def mix_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("kmix") / f"{request.param}.gguf", MIXES[request.param])


def test_the_default_load_computes_with_the_k_quant_blocks(mix_file: Path) -> None:
    blocks = load(str(mix_file)).model
    floats = load(str(mix_file), quant="none").model
    layer = blocks.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = getattr(layer.self_attn, name)
        assert type(module).__name__ in ("KQuantLinear", "RawBlockLinear", "Int4Linear")
        if module.__dict__.get("qtype") in kernels.KQUANT_TYPES:
            assert isinstance(module, KQuantLinear)
    summary = kernel_summary(blocks)
    assert any("k-quant kernel" in kernel for kernel in summary.values()), summary
    ids = torch.tensor([[61, 3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9]])
    with torch.inference_mode():
        expected = floats.logits(floats(ids))
        out = blocks.logits(blocks(ids))
    # 8-bit activations per 256 values against the same weights dequantized to float32
    assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.995
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_greedy_output_is_the_same_batched_and_alone(mix_file: Path) -> None:
    llm = LLM(str(mix_file), max_model_len=256)
    prompts = [[61, *range(i, i + 3 + 2 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    together = [c.token_ids for c in llm.generate(prompts, params)]
    assert together == alone


def test_a_tensor_type_without_a_dequantizer_is_refused_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "iq2.gguf", {**MIXES["q4_k_m"], "ffn_up": Q.IQ2_XS})
    with pytest.raises(ModelFileError, match=r"tensor blk.0.ffn_up.weight has type IQ2_XS"):
        load(str(path))
