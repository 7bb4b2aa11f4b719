"""LoRA training on a tiny Llama: schedule vs transformers, checkpointing, loss falls, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from levante.chat import JinjaChatFormat
from levante.errors import ConfigError
from levante.finetune import train as train_module
from levante.finetune.data import Conversation, Example, encode_conversation
from levante.finetune.loss import evaluate, token_loss
from levante.finetune.synthetic import make_dataset
from levante.finetune.train import (
    TrainConfig,
    add_lora,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    lr_factor,
    train,
)
from levante.model import Transformer
from levante.tokenizer import HFTokenizer

FAST: dict[str, Any] = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "batch_size": 4,
                        "max_seq_len": 256, "seed": 0}


@pytest.fixture(scope="module")
def examples(tiny_chat: JinjaChatFormat, tiny_tokenizer: HFTokenizer) -> list[Example]:
    """24 synthetic JSON-answer conversations encoded in ChatML."""
    train_rows, _ = make_dataset(num_train=24, num_heldout=1)
    return [encode_conversation(tiny_chat, Conversation(r["messages"], None, f"t:{i}"),
                                eos_ids=tiny_tokenizer.eos_ids) for i, r in enumerate(train_rows)]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_matches_transformers(schedule: str) -> None:
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = {"cosine": get_cosine_schedule_with_warmup,
            "linear": get_linear_schedule_with_warmup}[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = make(optimizer, num_warmup_steps=5, num_training_steps=40)
    for step in range(40):
        ours = lr_factor(step, warmup=5, total=40, schedule=schedule)
        # transformers' warmup starts at 0 (step/warmup); ours at 1/(warmup+1), never a dead step
        expected = (step + 1) / 6 if step < 5 else reference.get_last_lr()[0]
        assert ours == pytest.approx(expected, abs=1e-9), step
        optimizer.step()
        reference.step()


def test_gradient_checkpointing_gives_the_same_gradients(
        tiny_model: Callable[[], Transformer], examples: list[Example]) -> None:
    from levante.finetune.data import collate

    ids, mask = collate(examples[:4], pad_id=0)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        peft_model = add_lora(model, TrainConfig(**FAST))
        torch.manual_seed(1)
        for p in peft_model.parameters():  # non-zero B so every LoRA weight gets a gradient
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        if checkpointing:
            enable_gradient_checkpointing(model)
        loss, _ = token_loss(model, ids, mask)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters()
                      if p.requires_grad})
        disable_gradient_checkpointing(model)
        assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_short_run_lowers_loss_on_its_data(tiny_model: Callable[[], Transformer],
                                           examples: list[Example]) -> None:
    model = tiny_model()
    config = TrainConfig(**{**FAST, "alpha": 64.0}, lr=3e-3, epochs=6, warmup_ratio=0.1)
    peft_model = add_lora(model, config)
    before = evaluate(model, examples, batch_size=8, pad_id=0)
    result = train(peft_model, examples, config, pad_id=0, eval_examples=examples)
    after = evaluate(model, examples, batch_size=8, pad_id=0)
    assert result.num_steps == 6 * 6 and len(result.history) == 36
    # a random base with a frozen random head: from ln(387) = 5.96 to about 4.9
    assert after.loss < 0.9 * before.loss, (before, after)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-6:]) < 0.9 * sum(losses[:6])
    assert result.evals[0][1].loss == pytest.approx(before.loss)
    assert result.evals[-1][1].loss == pytest.approx(after.loss)
    base_params = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base_params)


def _lora_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_interrupted_run_resumes_to_the_same_weights(
        tmp_path: Path, tiny_model: Callable[[], Transformer], examples: list[Example],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(**{**FAST, "dropout": 0.1}, lr=1e-3, max_steps=6, grad_accum=2,
                         save_every=1)
    straight = add_lora(tiny_model(), config)
    train(straight, examples, config, pad_id=0, out_dir=tmp_path / "a")

    interrupted = add_lora(tiny_model(), config)
    real_step = train_module._optimizer_step
    calls = []

    def crash_after_three(*args: object, **kwargs: object) -> tuple[float, int]:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "_optimizer_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, examples, config, pad_id=0, out_dir=tmp_path / "b")
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    resumed = add_lora(tiny_model(), config)
    result = train(resumed, examples, config, pad_id=0, out_dir=tmp_path / "b", resume=True)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    expected, actual = _lora_state(straight), _lora_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_resume_refuses_other_settings(tmp_path: Path, tiny_model: Callable[[], Transformer],
                                       examples: list[Example]) -> None:
    config = TrainConfig(**FAST, max_steps=1)
    train(add_lora(tiny_model(), config), examples, config, pad_id=0, out_dir=tmp_path)
    other = TrainConfig(**{**FAST, "rank": 4}, max_steps=1)
    with pytest.raises(ConfigError, match="rank"):
        train(add_lora(tiny_model(), other), examples, other, pad_id=0, out_dir=tmp_path,
              resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(add_lora(tiny_model(), config), examples, config, pad_id=0,
              out_dir=tmp_path / "empty", resume=True)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.rank"):
        TrainConfig(rank=0)
    with pytest.raises(ConfigError, match="TrainConfig.schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="TrainConfig.quant"):
        TrainConfig(quant="int3")
    assert TrainConfig(rank=32).lora_alpha == 64.0


def test_unknown_target_module_is_a_config_error(tiny_model: Callable[[], Transformer]) -> None:
    with pytest.raises(ConfigError, match="qkv_proj"):
        add_lora(tiny_model(), TrainConfig(**FAST, target_modules=("qkv_proj",)))


def test_finetune_end_to_end_on_a_mistral_folder(tmp_path: Path,
                                                narrow_mistral_dir: Path) -> None:
    """The CLI's entry: data with a bad line and a mix, held-out eval, adapter, merge."""
    from levante.finetune.job import finetune

    train_rows, heldout = make_dataset(num_train=8, num_heldout=2)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows) + "{broken\n")
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello!"}]}))
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in heldout))
    config = TrainConfig(**{**FAST, "batch_size": 2}, max_steps=2, gradient_checkpointing=True)
    out = finetune(str(narrow_mistral_dir), data, tmp_path / "out", config=config,
                   mix=[f"{general}:0.2"], eval_path=held, merge=True, num_compare=2)
    assert out.data.problems == [(f"{data}:9: not valid JSON (Expecting property name "
                                  "enclosed in double quotes at column 2)")]
    assert out.data.mixed == {str(general): 2}
    assert (out.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((out.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    assert out.eval_before is not None and out.eval_after is not None
    assert len(out.comparisons) == 2 and out.comparisons[0].reference.startswith('{"answer"')
    assert out.merged_dir is not None and (out.merged_dir / "model.safetensors").is_file()
    assert (out.merged_dir / "tekken.json").is_file()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_qlora_trains_on_a_quantized_frozen_base(
        fmt: str, tmp_path: Path, tiny_model: Callable[[], Transformer],
        examples: list[Example]) -> None:
    from levante.finetune.adapters import load_adapter, save_adapter
    from levante.quant.linear import Int4Linear, Int8Linear

    config = TrainConfig(**{**FAST, "alpha": 64.0}, lr=3e-3, epochs=6, warmup_ratio=0.1,
                         quant=fmt)
    float_loss = evaluate(tiny_model(), examples, batch_size=8, pad_id=0).loss
    model = tiny_model()
    peft_model = add_lora(model, config)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is (Int8Linear if fmt == "int8" else Int4Linear)
    assert type(model.lm_head) is Int8Linear  # the head stays 8-bit under int4
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    before = evaluate(model, examples, batch_size=8, pad_id=0)
    assert before.loss == pytest.approx(float_loss, rel=0.02)  # quantization barely moves it
    train(peft_model, examples, config, pad_id=0)
    after = evaluate(model, examples, batch_size=8, pad_id=0)
    assert after.loss < 0.9 * before.loss, (before, after)
    # the adapter is a plain LoRA: it loads on the float base and keeps most of the gain
    save_adapter(peft_model, tmp_path, base_ref="tiny")
    on_float = evaluate(load_adapter(tiny_model(), tmp_path).get_base_model(), examples,
                        batch_size=8, pad_id=0)
    assert on_float.loss < 0.92 * float_loss
