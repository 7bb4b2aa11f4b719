"""ModelConfig from model files: real configs load; features Levante lacks are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from levante.bundle import load
from levante.config import PRESETS, ModelConfig
from levante.errors import ConfigError, ModelFileError

# Mistral-Small-24B-Instruct-2501 as shipped (shared/NOTES.md: head_dim 128 explicit, rope
# theta 1e8 at the top level, no sliding window, untied output).
MISTRAL_SMALL_3_CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 100000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.49.0.dev0", "use_cache": True, "vocab_size": 131072}
MISTRAL_SMALL_3_PARAMS: dict[str, Any] = {
    "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 32768, "n_heads": 32,
    "n_kv_heads": 8, "rope_theta": 100000000.0, "norm_eps": 1e-05, "vocab_size": 131072}
# What llama.cpp's converter writes for it (general.architecture llama).
MISTRAL_SMALL_3_GGUF: dict[str, Any] = {
    "general.architecture": "llama", "llama.block_count": 40, "llama.context_length": 32768,
    "llama.embedding_length": 5120, "llama.feed_forward_length": 32768,
    "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
    "llama.rope.freq_base": 100000000.0, "llama.attention.layer_norm_rms_epsilon": 1e-05,
    "llama.attention.key_length": 128, "llama.attention.value_length": 128,
    "llama.vocab_size": 131072, "llama.rope.dimension_count": 128,
    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_mistral_small_3_files_give_the_preset() -> None:
    preset = PRESETS["mistral-small-3"]
    assert ModelConfig.from_hf(MISTRAL_SMALL_3_CONFIG) == preset
    assert ModelConfig.from_params(MISTRAL_SMALL_3_PARAMS) == preset
    assert ModelConfig.from_gguf(MISTRAL_SMALL_3_GGUF, has_output_tensor=True) == preset


@pytest.mark.parametrize("changes", [
    {"rope_scaling": None},
    {"rope_scaling": {"rope_type": "default"}},
    {"rope_theta": None, "rope_parameters": {"rope_theta": 1e8, "rope_type": "default"}},
    {"sliding_window": 32768},  # as long as the context: never slides
    {"sliding_window": 131072},
    {"use_sliding_window": False, "sliding_window": 4096},  # Qwen2's switch, off
    {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
])
def test_hf_settings_that_change_nothing_load(changes: dict[str, Any]) -> None:
    config = ModelConfig.from_hf({**MISTRAL_SMALL_3_CONFIG, **changes})
    assert config == PRESETS["mistral-small-3"]


def test_configs_transformers_writes_load() -> None:
    """transformers 5 writes rope_parameters, not rope_theta; Llama adds bias flags."""
    from transformers import LlamaConfig, MistralConfig

    mistral = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, sliding_window=None, rope_theta=1e8).to_dict()
    assert "rope_parameters" in mistral
    assert ModelConfig.from_hf(mistral).rope_theta == 1e8
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                        rope_scaling=None).to_dict()
    assert ModelConfig.from_hf(llama).head_dim == 16


def test_transformers_default_mistral_window_is_refused() -> None:
    """MistralConfig() defaults to a 4096 window over 131072 positions: that one slides."""
    from transformers import MistralConfig

    with pytest.raises(ConfigError, match=r"config\.json sets sliding_window = 4096: "
                                          r"sliding-window attention"):
        ModelConfig.from_hf(MistralConfig().to_dict())


HF_REFUSALS = [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "RoPE scaling"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     "RoPE scaling"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "RoPE scaling"),
    ("rope_parameters", {"rope_theta": 1e8, "rope_type": "linear", "factor": 2.0},
     "RoPE scaling"),
    ("sliding_window", 4096, "sliding-window attention"),
    ("attention_bias", True, "projection bias"),
    ("mlp_bias", True, "projection bias"),
    ("hidden_act", "gelu_pytorch_tanh", "activation other than SiLU"),
    ("model_type", "qwen2", "this architecture"),
    ("model_type", "mistral3", "this architecture"),
    ("quantization_config", {"quant_method": "fp8"}, "pre-quantized"),
]


@pytest.mark.parametrize(("key", "value", "feature"), HF_REFUSALS)
def test_hf_features_levante_lacks_are_refused(key: str, value: Any, feature: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_hf({**MISTRAL_SMALL_3_CONFIG, key: value})
    message = str(caught.value)
    assert message.startswith(f"config.json sets {key} = "), message
    assert feature in message and "not implemented" in message, message


@pytest.mark.parametrize("changes", [
    {"sliding_window": None, "lora": None, "moe": None, "max_batch_size": 1},
    {"sliding_window": 32768},
    {"max_seq_len": 4096, "sliding_window": 4096},
    {"model_type": "transformer", "tied_embeddings": False},
])
def test_params_settings_that_change_nothing_load(changes: dict[str, Any]) -> None:
    config = ModelConfig.from_params({**MISTRAL_SMALL_3_PARAMS, **changes})
    assert config.replace(max_seq_len=32768) == PRESETS["mistral-small-3"]


@pytest.mark.parametrize(("key", "value"), [
    ("sliding_window", 4096), ("_sliding_window", 4096),
    ("moe", {"num_experts": 8, "num_experts_per_tok": 2}), ("lora", {"rank": 16}),
    ("vision_encoder", {"hidden_size": 1024, "image_size": 1540}), ("model_type", "mamba"),
    ("yarn", {"factor": 4.0}),
])
def test_params_features_levante_lacks_are_refused(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_params({**MISTRAL_SMALL_3_PARAMS, key: value})
    message = str(caught.value)
    assert message.startswith(f"params.json sets {key} = "), message
    assert "not implemented" in message, message


@pytest.mark.parametrize("changes", [
    {"llama.rope.scaling.type": "none"},
    {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0},
    {"llama.rope.scaling.factor": 0.0},  # llama.cpp: 0 = not set
    {"llama.attention.sliding_window": 32768},
    {"llama.expert_count": 0},
])
def test_gguf_settings_that_change_nothing_load(changes: dict[str, Any]) -> None:
    config = ModelConfig.from_gguf({**MISTRAL_SMALL_3_GGUF, **changes}, has_output_tensor=True)
    assert config == PRESETS["mistral-small-3"]


@pytest.mark.parametrize(("key", "value", "feature"), [
    ("llama.rope.scaling.type", "yarn", "RoPE scaling"),
    ("llama.rope.scaling.factor", 8.0, "RoPE scaling"),
    ("llama.rope.scale_linear", 2.0, "RoPE scaling"),
    ("llama.attention.sliding_window", 4096, "sliding-window attention"),
    ("llama.rope.dimension_count", 64, "part of a head"),
    ("llama.expert_count", 8, "mixture of experts"),
])
def test_gguf_features_levante_lacks_are_refused(key: str, value: Any, feature: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_gguf({**MISTRAL_SMALL_3_GGUF, key: value}, has_output_tensor=True)
    message = str(caught.value)
    assert message.startswith(f"GGUF metadata sets {key} = "), message
    assert feature in message and "not implemented" in message, message


# --- loading a model names the file and the key --------------------------------------------

def _small_hf(**changes: Any) -> dict[str, Any]:
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 256}
    return {**MISTRAL_SMALL_3_CONFIG, **small, **changes}


def test_load_names_config_json_and_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_small_hf(attention_bias=True)))
    with pytest.raises(ModelFileError) as caught:
        load(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "config.json") in message and "attention_bias" in message, message


def test_load_names_params_json_and_key(tmp_path: Path) -> None:
    params = {**MISTRAL_SMALL_3_PARAMS, "sliding_window": 4096}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelFileError) as caught:
        load(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "params.json") in message and "sliding_window = 4096" in message


def test_load_names_gguf_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in MISTRAL_SMALL_3_GGUF.items():
        if key != "general.architecture":
            writer.add_key_value(key, value, gguf.GGUFValueType.FLOAT32 if isinstance(value, float)
                                 else gguf.GGUFValueType.UINT32)
    writer.add_string("llama.rope.scaling.type", "yarn")
    writer.add_float32("llama.rope.scaling.factor", 4.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError) as caught:
        load(str(path))
    message = str(caught.value)
    assert str(path) in message and "llama.rope.scaling.type = 'yarn'" in message, message
