"""`levante quantize`: GGUF files read back by gguf-py and Levante; int8/int4 folders load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import load_file, save_file

from levante.config import ModelConfig
from levante.errors import ConfigError
from levante.model import Transformer
from levante.quant.export import export_type, quantize_checkpoint
from levante.quant.gguf_linear import load_gguf_quantized
from levante.quant.linear import load_quantized_checkpoint, read_quant_metadata
from levante.weights.gguf import GGUFFile, load_gguf_state_dict
from levante.weights.layout import expected_shapes

Q = GGMLQuantizationType
TINY_LLAMA = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """An HF folder: random tiny Llama weights with SmolLM2's byte-level BPE tokenizer."""
    from levante.tokenizer import HFTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = ModelConfig.from_hf(TINY_LLAMA)
    torch.manual_seed(0)
    model = Transformer(config)
    state = {name: torch.randn(shape) * 0.05 if len(shape) == 2 else torch.ones(shape)
             for name, shape in expected_shapes(config).items()}
    model.load_state_dict(state, strict=False)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "llama"}))
    meta = GGUFFile(smollm2_gguf).metadata
    HFTokenizer.from_gguf_metadata(meta).backend.save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokens[1], "eos_token": tokens[2], "add_bos_token": False}))
    return folder


def _source_model(folder: Path) -> tuple[ModelConfig, Transformer]:
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    return config, Transformer.from_state_dict(config, load_file(folder / "model.safetensors"))


def _logits(model: Transformer, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.logits(model(ids))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# 4 bits on Gaussian weights leave ~8% noise per weight: cosine ~0.96-0.98 at the logits
@pytest.mark.parametrize(("fmt", "min_cosine"), [("q8_0", 0.9995), ("q4_0", 0.95),
                                                  ("q4_1", 0.96), ("q4_mix", 0.96)])
def test_gguf_output_reads_back(tiny_llama: Path, tmp_path: Path, fmt: str,
                                min_cosine: float) -> None:
    out = tmp_path / f"tiny-{fmt}.gguf"
    result = quantize_checkpoint(tiny_llama, to=fmt, out=out, progress=False)
    config, source = _source_model(tiny_llama)
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(expected_shapes(config)) == result.num_tensors
    assert tensors["blk.1.ffn_down.weight"].shape.tolist() == [128, 64]  # innermost first
    assert tensors["token_embd.weight"].shape.tolist() == [64, 49152]
    for ours, name in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                       ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"),
                       ("lm_head.weight", "output.weight"), ("model.norm.weight",
                                                             "output_norm.weight")]:
        shape = expected_shapes(config)[ours]
        assert tensors[name].tensor_type == export_type(fmt, ours, shape, 2)
    if fmt == "q4_mix":  # llama.cpp's Q4_K_M choices, written as Q4_1 / Q8_0
        assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_1
        assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q4_1
        assert tensors["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0  # the last eighth
        assert tensors["output.weight"].tensor_type == Q.Q8_0
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    gguf_file = GGUFFile(out)
    config = ModelConfig.from_gguf(gguf_file.metadata, has_output_tensor=True)
    dequantized = Transformer.from_state_dict(config, load_gguf_state_dict(gguf_file, config,
                                                                           torch.float32))
    expected = _logits(source)
    assert _cosine(_logits(dequantized), expected) > min_cosine
    assert _cosine(_logits(load_gguf_quantized(gguf_file, config, torch.float32)),
                   expected) > min_cosine - 0.01


def test_gguf_source_keeps_its_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    from levante.bundle import load

    first = tmp_path / "first.gguf"
    quantize_checkpoint(tiny_llama, to="q8_0", out=first, progress=False)
    second = tmp_path / "second.gguf"
    result = quantize_checkpoint(first, to="q4_1", out=second, progress=False)
    assert result.tensor_types == {"Q4_1": 15, "F32": 5, "Q8_0": 1}  # output head at Q8_0
    before, after = GGUFFile(first).metadata, GGUFFile(second).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id"):
        assert after[key] == before[key]
    bundle = load(str(second))
    assert bundle.tokenizer.encode("Hello world") == load(str(first)).tokenizer.encode(
        "Hello world")


def test_tekken_tokenizer_is_written(tiny_mistral_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "mistral.gguf"
    quantize_checkpoint(tiny_mistral_hf, to="f16", out=out, progress=False)
    meta = GGUFFile(out).metadata
    assert meta["tokenizer.ggml.pre"] == "tekken"
    assert len(meta["tokenizer.ggml.tokens"]) == 131072
    assert meta["tokenizer.ggml.bos_token_id"] == 1


@pytest.mark.parametrize(("fmt", "min_cosine"), [("int8", 0.9995), ("int4", 0.96)])
def test_levante_checkpoint_loads_back(tiny_llama: Path, tmp_path: Path, fmt: str,
                                       min_cosine: float) -> None:
    out = tmp_path / fmt
    quantize_checkpoint(tiny_llama, to=fmt, out=out, progress=False)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json",
                                               "tokenizer.json", "tokenizer_config.json"}
    assert read_quant_metadata(out / "model.safetensors") == {"version": 1, "format": fmt,
                                                              "group_size": 32}
    config, source = _source_model(tiny_llama)
    assert ModelConfig.from_hf(json.loads((out / "config.json").read_text())) == config
    loaded = load_quantized_checkpoint([out / "model.safetensors"], config, torch.float32)
    assert _cosine(_logits(loaded), _logits(source)) > min_cosine


def test_consolidated_and_hf_sources_agree(tiny_mistral_hf: Path,
                                           tiny_mistral_consolidated: Path,
                                           tmp_path: Path) -> None:
    quantize_checkpoint(tiny_mistral_hf, to="int8", out=tmp_path / "hf", progress=False)
    quantize_checkpoint(tiny_mistral_consolidated, to="int8", out=tmp_path / "mistral",
                        progress=False)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    mistral = load_file(tmp_path / "mistral" / "model.safetensors")
    assert hf.keys() == mistral.keys()
    for name in hf:
        assert torch.equal(hf[name], mistral[name]), name


def test_k_quants_are_refused_with_the_alternative(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="q4_mix"):
        quantize_checkpoint(tiny_llama, to="q4_k_m", out=tmp_path / "x.gguf", progress=False)
