"""Adapters against HF peft + transformers, merged checkpoints, several adapters in one batch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from levante.errors import ModelFileError, RequestError
from levante.finetune.adapters import (
    attach_adapters,
    load_adapter,
    read_adapter,
    save_adapter,
)
from levante.finetune.train import TrainConfig, add_lora
from levante.model import Transformer

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 11, 5], [2, 8, 300, 12, 33, 71, 4, 90, 6, 120]])


def logits(model: Transformer, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


def make_adapter(model: Transformer, out: Path, *, rank: int = 8, seed: int = 0,
                 targets: tuple[str, ...] | None = None) -> Path:
    """A LoRA on `model` with random (non-zero) A and B, saved in PEFT format."""
    config = TrainConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, seed=seed,
                         **({"target_modules": targets} if targets else {}))
    peft_model = add_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_adapter(peft_model, out, base_ref="tiny")
    return out


@pytest.fixture(scope="module")
def adapter_pair(tmp_path_factory: pytest.TempPathFactory,
                 tiny_model: Callable[[], Transformer]) -> tuple[Path, Path]:
    """Two adapters for the tiny Llama: all projections at rank 8; q/v only at rank 4."""
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(tiny_model(), root / "first", rank=8, seed=1)
    second = make_adapter(tiny_model(), root / "second", rank=4, seed=2,
                          targets=("q_proj", "v_proj"))
    return first, second


@pytest.mark.parametrize("base", [
    "tiny_llama_dir", "tiny_mistral_hf", "narrow_mistral_dir"])
def test_hf_peft_loads_our_adapter_with_equal_logits(
        base: str, request: pytest.FixtureRequest, tmp_path: Path,
        folder_model: Callable[[Path], Transformer]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder: Path = request.getfixturevalue(base)
    ours = folder_model(folder)
    base_logits = logits(ours)
    adapter = make_adapter(ours, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    hf_peft = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        expected = hf_peft(input_ids=IDS).logits
    actual = logits(ours)
    assert (actual - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # and our own loader applies it identically
    reloaded = load_adapter(folder_model(folder), adapter)
    torch.testing.assert_close(logits(reloaded.get_base_model()), actual, rtol=0, atol=0)


def test_saved_keys_are_peft_names(adapter_pair: tuple[Path, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(adapter_pair[0] / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2


def test_merged_checkpoint_equals_base_plus_adapter(
        tmp_path: Path, narrow_mistral_dir: Path,
        folder_model: Callable[[Path], Transformer]) -> None:
    from transformers import AutoModelForCausalLM

    from levante.finetune.job import merge_adapter

    adapter = make_adapter(folder_model(narrow_mistral_dir), tmp_path / "adapter")
    expected = logits(load_adapter(folder_model(narrow_mistral_dir), adapter).get_base_model())
    merged_dir = merge_adapter(str(narrow_mistral_dir), adapter, tmp_path / "merged")
    assert {p.name for p in merged_dir.iterdir()} >= {"config.json", "model.safetensors",
                                                      "tekken.json"}
    torch.testing.assert_close(logits(folder_model(merged_dir)), expected, rtol=1e-4, atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_two_adapters_and_the_base_in_one_batch(
        adapter_pair: tuple[Path, Path], tiny_model: Callable[[], Transformer]) -> None:
    first, second = adapter_pair
    alone = [logits(tiny_model()), logits(load_adapter(tiny_model(), first).get_base_model()),
             logits(load_adapter(tiny_model(), second).get_base_model())]
    model = tiny_model()
    served = attach_adapters(model, {"first": first, "second": second})
    assert served.names == ("first", "second") and served.index_of("second") == 2
    batch = torch.stack([IDS[0], IDS[1], IDS[0]])  # [3, S]; row r is prompt r % 2
    for order in ([0, 1, 2], [2, 0, 1], [1, 1, 0]):  # row r uses adapter order[r]
        served.set_token_adapters(torch.tensor(order)[:, None].expand(batch.shape))
        out = logits(model, batch)
        for r, adapter_id in enumerate(order):
            torch.testing.assert_close(out[r], alone[adapter_id][r % 2], rtol=1e-5, atol=1e-5)
    served.clear()
    torch.testing.assert_close(logits(model), alone[0], rtol=0, atol=0)
    served.detach()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model), alone[0], rtol=0, atol=0)


def test_set_batch_builds_the_token_index(adapter_pair: tuple[Path, Path],
                                          tiny_model: Callable[[], Transformer]) -> None:
    served = attach_adapters(tiny_model(), {"first": adapter_pair[0]})
    served.set_batch([1, 0, 1], [3, 2, 1])  # three requests with 3, 2 and 1 new tokens
    assert served.context.shape == (6,)
    assert [(a, rows.tolist()) for a, rows in served.context.groups] == [(1, [0, 1, 2, 5])]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        served.set_token_adapters(torch.tensor([0, 2]))
    with pytest.raises(RequestError, match="unknown adapter 'nope'"):
        served.index_of("nope")
    assert served.index_of(None) == 0


def test_adapter_for_another_base_is_refused(tmp_path: Path, narrow_mistral_dir: Path,
                                             tiny_model: Callable[[], Transformer],
                                             folder_model: Callable[[Path], Transformer]) -> None:
    adapter = make_adapter(folder_model(narrow_mistral_dir), tmp_path / "mistral-adapter",
                           targets=("q_proj",))
    with pytest.raises(ModelFileError, match="another base model"):
        attach_adapters(tiny_model(), {"m": adapter})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="adapter_config.json"):
        read_adapter(tmp_path / "empty")


def test_read_adapter_scales_b(adapter_pair: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    weights = read_adapter(adapter_pair[1])  # rank 4, alpha 8: scale 2
    raw = load_file(str(adapter_pair[1] / "adapter_model.safetensors"))
    a, b = weights.modules["model.layers.0.self_attn.v_proj"]
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(a, raw[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(b, 2.0 * raw[f"{prefix}.lora_B.weight"])
    assert set(weights.modules) == {f"model.layers.{i}.self_attn.{m}_proj"
                                    for i in (0, 1) for m in "qv"}


def test_engine_serves_two_adapters_and_the_base_in_one_batch(
        adapter_pair: tuple[Path, Path], tiny_model: Callable[[], Transformer]) -> None:
    """Through the engine's flattened batches (and its prefix cache keyed by adapter)."""
    from levante.config import EngineConfig
    from levante.engine.engine import Engine
    from levante.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = IDS[0].tolist()
    config = EngineConfig(max_model_len=64, num_kv_blocks=32, block_size=4,
                          enable_prefix_caching=True)
    model = tiny_model()
    served = attach_adapters(model, {"first": adapter_pair[0], "second": adapter_pair[1]})
    engine = Engine(model, None, config, adapters=served)

    def run(adapter_ids: list[int]) -> list[list[int]]:
        ids = [engine.add_request(prompt, params, adapter_id=a) for a in adapter_ids]
        outs = engine.run_to_completion(ids)
        return [[t for o in outs[rid] for t in o.new_token_ids] for rid in ids]

    alone = [run([a])[0] for a in (0, 1, 2)]
    assert len({tuple(a) for a in alone}) == 3  # the adapters change the output
    assert run([2, 0, 1]) == [alone[2], alone[0], alone[1]]
