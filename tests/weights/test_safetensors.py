"""Bad safetensors checkpoints give errors that name the file and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from levante.bundle import load
from levante.errors import ModelFileError


@pytest.fixture()
def copy(tiny_mistral_hf: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_mistral_hf, folder)
    return folder


def test_loads_with_mistral_tokenizer(tiny_mistral_hf: Path) -> None:
    bundle = load(str(tiny_mistral_hf))
    assert bundle.format == "safetensors-hf" and bundle.tokenizer.vocab_size == 131072
    assert type(bundle.chat_format).__name__ == "MistralChatFormat"


def test_consolidated_folder_loads(tiny_mistral_consolidated: Path) -> None:
    bundle = load(str(tiny_mistral_consolidated))
    assert bundle.format == "safetensors-consolidated" and bundle.config.head_dim == 128


def test_truncated_file(copy: Path) -> None:
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load(str(copy))


def test_garbage_file(copy: Path) -> None:
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        load(str(copy))


def test_missing_tensor(copy: Path) -> None:
    path = copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ModelFileError, match="missing tensor model.layers.1.mlp.down_proj"):
        load(str(copy))


def test_shape_disagrees_with_config(copy: Path) -> None:
    path = copy / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 320)
    save_file(tensors, path)
    with pytest.raises(ModelFileError, match=r"k_proj.weight has shape \(64, 320\), expected "
                                              r"\(128, 320\)"):
        load(str(copy))


def test_missing_shard_in_index(copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="missing"):
        load(str(copy))


def test_remote_code_refused(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="remote code"):
        load(str(copy))


def test_bad_config_field(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="config.json.*num_kv_heads"):
        load(str(copy))


def test_hf_folder_with_jinja_template(tmp_path: Path, smollm2_gguf: Path) -> None:
    """An HF Llama folder (tokenizer.json + tokenizer_config.json with a chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    bundle = load(str(folder))
    messages = [{"role": "user", "content": "Hello there"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             return_dict=False)
    assert bundle.chat_format is not None
    assert bundle.chat_format.encode(messages) == list(expected)
