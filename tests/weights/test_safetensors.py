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


# --- tensors Levante would not compute with are refused, not dropped -----------------------

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e8,
             max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Mistral HF folder (config.json, model.safetensors) from transformers."""
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("small-mistral")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**SMALL)).save_pretrained(folder)
    return folder


def _variant(small_hf: Path, tmp_path: Path, *, add: dict[str, torch.Tensor] | None = None,
             drop: tuple[str, ...] = (), **config_changes: object) -> Path:
    """A copy of `small_hf` with tensors added or dropped and config.json fields changed."""
    folder = tmp_path / "variant"
    folder.mkdir()
    tensors = {k: v for k, v in load_file(small_hf / "model.safetensors").items()
               if k not in drop}
    save_file(tensors | (add or {}), folder / "model.safetensors")
    config = json.loads((small_hf / "config.json").read_text()) | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _state(folder: Path, *, consolidated: bool = False) -> dict[str, torch.Tensor]:
    from levante.config import ModelConfig
    from levante.weights.safetensors import (
        consolidated_shards,
        hf_shards,
        load_safetensors_state_dict,
    )

    if consolidated:
        config = ModelConfig.from_params(json.loads((folder / "params.json").read_text()))
        files = consolidated_shards(folder)
    else:
        config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        files = hf_shards(folder)
    return load_safetensors_state_dict(files, config, dtype=torch.float32,
                                       consolidated=consolidated)


def _refusal(folder: Path, *fragments: str, consolidated: bool = False) -> str:
    """The ModelFileError loading `folder` gives; it must name each fragment."""
    with pytest.raises(ModelFileError) as caught:
        _state(folder, consolidated=consolidated)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(("name", "why"), [
    ("model.layers.0.self_attn.q_proj.bias", "is a bias"),  # Qwen2-style q/k/v biases
    ("model.layers.1.mlp.down_proj.bias", "is a bias"),  # mlp_bias
    ("model.layers.0.self_attn.q_norm.weight", "has no place in the model"),  # Qwen3-style
    ("model.layers.2.mlp.up_proj.weight", "config.json describes (2 layers"),
    ("score.weight", "has no place in the model"),
])
def test_tensor_the_model_has_no_place_for_is_refused(small_hf: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      name: str, why: str) -> None:
    folder = _variant(small_hf, tmp_path, add={name: torch.ones(64)})
    # refused from the headers, before any weight is read
    monkeypatch.setattr("levante.weights.safetensors._converted",
                        lambda *a: pytest.fail("a weight was read before the refusal"))
    _refusal(folder, str(folder / "model.safetensors"), f"tensor {name} ", why)


def test_rotary_inv_freq_buffers_are_ignored(small_hf: Path, tmp_path: Path) -> None:
    """Old checkpoints carry rotary_emb.inv_freq: it follows from rope_theta (as transformers)."""
    folder = _variant(small_hf, tmp_path, add={
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    state, plain = _state(folder), _state(small_hf)
    assert state.keys() == plain.keys()
    assert all(torch.equal(state[k], plain[k]) for k in plain)


def test_untied_config_without_output_head_is_refused(small_hf: Path, tmp_path: Path) -> None:
    folder = _variant(small_hf, tmp_path, drop=("lm_head.weight",))
    _refusal(folder, str(folder / "model.safetensors"), "missing tensor lm_head.weight",
             "tie_word_embeddings false")


def test_tied_config_with_a_different_output_head_is_refused(small_hf: Path,
                                                             tmp_path: Path) -> None:
    folder = _variant(small_hf, tmp_path, tie_word_embeddings=True)
    _refusal(folder, str(folder / "model.safetensors"), "tensor lm_head.weight differs from "
             "the embedding", "tie_word_embeddings true")


def test_tied_config_with_an_equal_output_head_loads(small_hf: Path, tmp_path: Path) -> None:
    embedding = load_file(small_hf / "model.safetensors")["model.embed_tokens.weight"]
    folder = _variant(small_hf, tmp_path, add={"lm_head.weight": embedding.clone()},
                      tie_word_embeddings=True)
    state = _state(folder)
    assert "lm_head.weight" not in state
    assert torch.equal(state["model.embed_tokens.weight"], embedding)


def test_tensor_stored_in_two_shards_is_refused(small_hf: Path, tmp_path: Path) -> None:
    tensors = load_file(small_hf / "model.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(small_hf / "config.json", folder / "config.json")
    save_file(tensors, folder / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]},
              folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors",
                            "lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _refusal(folder, str(folder / "model-00002-of-00002.safetensors"),
             "tensor model.norm.weight is also stored in")


def test_consolidated_bias_is_refused_naming_the_stored_name(small_hf: Path,
                                                             tmp_path: Path) -> None:
    from levante.weights.layout import CONSOLIDATED_GLOBAL_NAMES, CONSOLIDATED_LAYER_NAMES

    to_mistral = {v: k for k, v in CONSOLIDATED_GLOBAL_NAMES.items()}
    layer_to_mistral = {v: k for k, v in CONSOLIDATED_LAYER_NAMES.items()}
    tensors = {}
    for name, tensor in load_file(small_hf / "model.safetensors").items():
        if name in to_mistral:
            tensors[to_mistral[name]] = tensor
        else:
            _, _, index, rest = name.split(".", 3)
            tensors[f"layers.{index}.{layer_to_mistral[rest]}"] = tensor
    c = SMALL
    params = {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
              "head_dim": c["head_dim"], "hidden_dim": c["intermediate_size"],
              "n_heads": c["num_attention_heads"], "n_kv_heads": c["num_key_value_heads"],
              "rope_theta": c["rope_theta"], "norm_eps": 1e-5, "vocab_size": c["vocab_size"]}
    folder = tmp_path / "consolidated"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    save_file(tensors, folder / "consolidated.safetensors")
    assert len(_state(folder, consolidated=True)) == len(tensors)
    save_file(tensors | {"layers.0.attention.wq.bias": torch.ones(64)},
              folder / "consolidated.safetensors")
    _refusal(folder, str(folder / "consolidated.safetensors"),
             "tensor layers.0.attention.wq.bias is a bias", consolidated=True)


# --- a checkpoint names only files inside its folder -----------------------------------------

def _sharded(small_hf: Path, tmp_path: Path, shard_name: str) -> Path:
    """An HF folder whose index puts every tensor in `shard_name`; the real shard lies in a
    sibling folder, `outside/model.safetensors`, so an escaping name would load."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(small_hf / "model.safetensors", outside / "model.safetensors")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(small_hf / "config.json", folder / "config.json")
    names = load_file(small_hf / "model.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard_name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shard_name", ["ABSOLUTE", "../outside/model.safetensors",
                                        "sub/../../outside/model.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(small_hf: Path, tmp_path: Path,
                                                            shard_name: str) -> None:
    shard_name = shard_name.replace("ABSOLUTE", str(tmp_path / "outside" / "model.safetensors"))
    folder = _sharded(small_hf, tmp_path, shard_name)
    with pytest.raises(ModelFileError) as caught:
        load(str(folder))
    message = str(caught.value)
    assert str(folder / "model.safetensors.index.json") in message
    assert f"shard {shard_name!r} lies outside the model folder" in message


def test_shard_linked_out_of_the_folder_is_refused(small_hf: Path, tmp_path: Path) -> None:
    folder = _sharded(small_hf, tmp_path, "model-00001-of-00001.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to(
        tmp_path / "outside" / "model.safetensors")
    _refusal(folder, str(folder / "model.safetensors.index.json"),
             "shard 'model-00001-of-00001.safetensors' is a symbolic link to",
             "outside the model folder")
    (folder / "model.safetensors.index.json").unlink()  # no index: model.safetensors alone
    (folder / "model.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    _refusal(folder, "shard 'model.safetensors' is a symbolic link")


def test_consolidated_shard_linked_out_of_the_folder_is_refused(tmp_path: Path,
                                                                tiny_mistral_consolidated: Path
                                                                ) -> None:
    folder = tmp_path / "consolidated"
    folder.mkdir()
    shutil.copy(tiny_mistral_consolidated / "params.json", folder / "params.json")
    (folder / "consolidated.safetensors").symlink_to(
        tiny_mistral_consolidated / "consolidated.safetensors")
    with pytest.raises(ModelFileError, match="shard 'consolidated.safetensors' is a symbolic "
                                             "link to .* outside the model folder"):
        load(str(folder))


def test_index_with_a_non_string_shard_is_refused(small_hf: Path, tmp_path: Path) -> None:
    folder = _sharded(small_hf, tmp_path, "model.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5}}')
    _refusal(folder, "shard name 5 is not a file name")


def test_hub_snapshot_links_into_its_blobs_load(small_hf: Path, tmp_path: Path) -> None:
    """huggingface_hub's cache: snapshots/REV/ holds links into the repo's blobs/ folder."""
    repo = tmp_path / "models--org--small"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(small_hf / name, repo / "blobs" / f"sha-{name}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", f"sha-{name}"))
    assert len(_state(snapshot)) == len(load_file(small_hf / "model.safetensors"))
