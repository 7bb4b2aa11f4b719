"""LoRA training through peft on our Transformer: schedule, accumulation, checkpointing, resume."""

from __future__ import annotations

import dataclasses
import math
import random
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from levante.errors import ConfigError
from levante.finetune.adapters import LORA_TARGETS
from levante.finetune.data import Example, collate
from levante.finetune.loss import EvalResult, evaluate, token_loss
from levante.model import Transformer

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one LoRA run (defaults follow the rank-64 practice of the issue)."""

    rank: int = 64
    alpha: float | None = None  # None: 2 x rank (scale 2, as mistral-finetune uses)
    dropout: float = 0.05
    lr: float = 1e-4
    schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    warmup_ratio: float = 0.05  # share of the steps spent ramping the learning rate up
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 2048
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16 (the frozen base; LoRA weights stay float32)
    gradient_checkpointing: bool = True
    target_modules: tuple[str, ...] = LORA_TARGETS
    eval_every: int | None = None  # steps between held-out evaluations (also before and after)
    save_every: int | None = None  # steps between resumable checkpoints (also at the end)
    seed: int = 0
    quant: str | None = None  # int8 | int4: QLoRA, the frozen base quantized

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"TrainConfig.{name} must be a positive integer or None, "
                                  f"got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.lr > 0 or (self.alpha is not None and not self.alpha > 0):
            raise ConfigError(f"TrainConfig.lr and alpha must be positive, got {self.lr!r}, "
                              f"{self.alpha!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"TrainConfig.warmup_ratio must be in [0, 1), got "
                              f"{self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"TrainConfig.schedule must be one of {SCHEDULES}, got "
                              f"{self.schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"TrainConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.quant not in (None, "int8", "int4"):
            raise ConfigError(f"TrainConfig.quant must be int8, int4 or None, got {self.quant!r}")
        if not self.target_modules:
            raise ConfigError("TrainConfig.target_modules must name at least one module")

    @property
    def lora_alpha(self) -> float:
        """The alpha peft scales by (alpha / rank)."""
        return self.alpha if self.alpha is not None else 2.0 * self.rank


def add_lora(model: Transformer, config: TrainConfig) -> PeftModel:
    """Wrap `model` with trainable LoRA pairs on `config.target_modules`; the base is frozen.

    The A matrices' random start depends only on `config.seed`. With `config.quant` (QLoRA)
    the frozen linears are then quantized (`quantize_frozen_base`).
    """
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            peft_model = get_peft_model(model, lora)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"--target-modules: {e}") from None
    if config.quant is not None:
        quantize_frozen_base(peft_model, config.quant)
    return peft_model


def quantize_frozen_base(peft_model: PeftModel, fmt: str) -> None:
    """QLoRA: every frozen linear in int8/int4 (levante.quant.linear); LoRA pairs stay float.

    LoRA goes on first, then the base layers inside peft's wrappers are swapped: peft cannot
    wrap our quantized linears itself (it places new layers by the target's `weight` or first
    parameter; ours hold only buffers). The swap follows `quantize_model`'s rule: the output
    head gets int8 under int4. The "dequantize" kernel keeps the layers differentiable with
    respect to their input; with gradient checkpointing only one layer's float weights exist
    at a time in the backward pass.
    """
    from levante.quant.linear import Int4Linear, Int8Linear

    model = peft_model.get_base_model()
    lora_ids = {id(m) for layer in model.modules() if isinstance(layer, LoraLayer)
                for pairs in (layer.lora_A, layer.lora_B) for m in pairs.values()}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or id(module) in lora_ids:
            continue
        weight = module.weight.detach()
        quantized: nn.Module = (
            Int8Linear.from_float(weight, kernel="dequantize")
            if fmt == "int8" or name.removesuffix(".base_layer") == "lm_head"
            else Int4Linear.from_float(weight, kernel="dequantize"))
        model.set_submodule(name, quantized.to(weight.device))


def enable_gradient_checkpointing(model: Transformer) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    model.py stays unaware of training: each layer gets an instance-level `forward` that runs
    the class's forward under torch.utils.checkpoint (parameter names do not change, so peft's
    keys stay HF's). `disable_gradient_checkpointing` removes it.
    """
    for layer in model.model.layers:
        plain = type(layer).forward

        def forward(self: torch.nn.Module, *args: Any, _plain: Callable[..., Any] = plain) -> Any:
            if not torch.is_grad_enabled():
                return _plain(self, *args)
            return torch.utils.checkpoint.checkpoint(_plain, self, *args, use_reentrant=False)

        layer.forward = types.MethodType(forward, layer)


def disable_gradient_checkpointing(model: Transformer) -> None:
    """Undo `enable_gradient_checkpointing`."""
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup` steps, then cosine or linear decay to 0 at `total`: the curves
    of transformers' get_{cosine,linear}_schedule_with_warmup, written here because transformers
    is only a test dependency of Levante.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a run did: optimizer steps, per-step loss log, held-out evaluations."""

    num_steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)
    seconds: float = 0.0
    num_tokens: int = 0


def micro_batches(examples: Sequence[Example], config: TrainConfig) -> list[list[Example]]:
    """The whole run's micro-batches in order: each epoch a fresh shuffle (seeded, so a resumed
    run replays the same order)."""
    per_epoch = math.ceil(len(examples) / config.batch_size)
    num_epochs = config.epochs if config.max_steps is None else \
        math.ceil(config.max_steps * config.grad_accum / per_epoch)
    batches = []
    for epoch in range(num_epochs):
        order = list(examples)
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        batches.extend(order[i:i + config.batch_size]
                       for i in range(0, len(order), config.batch_size))
    if config.max_steps is not None:
        batches = batches[:config.max_steps * config.grad_accum]
    return batches


def _steps(batches: list[list[Example]], grad_accum: int) -> Iterator[list[list[Example]]]:
    for i in range(0, len(batches), grad_accum):
        yield batches[i:i + grad_accum]


@dataclass
class _Run:
    """The moving parts of a run, so checkpoints save and restore them together."""

    peft_model: PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    step: int = 0
    result: TrainResult = field(default_factory=lambda: TrainResult(0))


def _optimizer_step(run: _Run, step_batches: list[list[Example]], pad_id: int) -> tuple[float, int]:
    """One optimizer step over its micro-batches; loss is the mean over all their targets."""
    model = run.peft_model.get_base_model()
    device = model.rope_cos.device
    num_targets = sum(e.num_targets - e.target_mask[0] for b in step_batches for e in b)
    total_loss, num_tokens = 0.0, 0
    for batch in step_batches:
        ids, mask = collate(batch, pad_id=pad_id)
        loss, _ = token_loss(model, ids.to(device), mask.to(device))
        (loss / max(num_targets, 1)).backward()
        total_loss += float(loss.detach())
        num_tokens += sum(len(e.token_ids) for e in batch)
    params = [p for p in run.peft_model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss / max(num_targets, 1), num_tokens


def save_checkpoint(run: _Run, folder: Path) -> None:
    """Adapter weights, optimizer, schedule, step and RNG state: enough to resume exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(run.peft_model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter.safetensors"))
    torch.save({"step": run.step, "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(),
                "config": dataclasses.asdict(run.config), "history": run.result.history,
                "num_tokens": run.result.num_tokens}, folder / "trainer_state.pt")


def load_checkpoint(run: _Run, folder: Path) -> None:
    """Restore a `save_checkpoint` folder into `run` (same hyper-parameters required)."""
    state_path = folder / "trainer_state.pt"
    if not state_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {folder} (expected trainer_state.pt)")
    state = torch.load(state_path, weights_only=True)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
    if saved != dataclasses.asdict(run.config):
        changed = sorted(k for k, v in dataclasses.asdict(run.config).items() if saved.get(k) != v)
        raise ConfigError(f"--resume: {folder} was trained with different settings: "
                          f"{', '.join(changed)}")
    set_peft_model_state_dict(run.peft_model, load_file(str(folder / "adapter.safetensors")))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    run.step = int(state["step"])
    run.result.history = list(state["history"])
    run.result.num_tokens = int(state["num_tokens"])


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                    TimeRemainingColumn(), console=console, disable=console is None)


def train(peft_model: PeftModel, examples: Sequence[Example], config: TrainConfig, *,
          pad_id: int, eval_examples: Sequence[Example] = (), out_dir: Path | None = None,
          resume: bool = False, console: Console | None = None) -> TrainResult:
    """Train the LoRA weights of `peft_model` on `examples`; evaluate and checkpoint on the way.

    Checkpoints go to out_dir/checkpoint (every `save_every` steps and at the end); `resume`
    continues from there. Held-out loss is measured before, every `eval_every` steps and after.
    Seeds torch's global RNG with `config.seed` (dropout), so a run is reproducible.
    """
    if not examples:
        raise ConfigError("no training examples left after loading the data")
    torch.manual_seed(config.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = micro_batches(examples, config)
    total = math.ceil(len(batches) / config.grad_accum)
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total, schedule=config.schedule))
    run = _Run(peft_model, optimizer, scheduler, config, result=TrainResult(total))
    checkpoint = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    if resume:
        if checkpoint is None:
            raise ConfigError("--resume needs --out (the checkpoint lives there)")
        load_checkpoint(run, checkpoint)
    model = peft_model.get_base_model()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    try:
        _loop(run, batches, pad_id, eval_examples, checkpoint, console)
    finally:
        disable_gradient_checkpointing(model)
        model.eval()
    return run.result


def _loop(run: _Run, batches: list[list[Example]], pad_id: int,
          eval_examples: Sequence[Example], checkpoint: Path | None,
          console: Console | None) -> None:
    config, result, model = run.config, run.result, run.peft_model.get_base_model()

    def evaluate_now() -> None:
        if not eval_examples:
            return
        measured = evaluate(model, eval_examples, batch_size=config.batch_size, pad_id=pad_id)
        result.evals.append((run.step, measured))
        if console is not None:
            console.print(f"step {run.step}: held-out loss {measured.loss:.4f}, perplexity "
                          f"{measured.perplexity:.2f} ({measured.num_tokens} tokens)",
                          highlight=False)

    evaluate_now()
    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("train", total=result.num_steps, completed=run.step,
                                 loss=float("nan"), tps=0.0)
        for step_batches in list(_steps(batches, config.grad_accum))[run.step:]:
            model.train()
            began = time.perf_counter()
            loss, num_tokens = _optimizer_step(run, step_batches, pad_id)
            run.step += 1
            result.num_tokens += num_tokens
            tps = num_tokens / max(time.perf_counter() - began, 1e-9)
            result.history.append({"step": run.step, "loss": loss, "tokens_per_s": tps,
                                   "lr": run.scheduler.get_last_lr()[0]})
            progress.update(task, advance=1, loss=loss, tps=tps)
            if config.eval_every and run.step % config.eval_every == 0 and run.step < result.num_steps:
                evaluate_now()
            if checkpoint is not None and config.save_every and run.step % config.save_every == 0:
                save_checkpoint(run, checkpoint)
    result.seconds = time.perf_counter() - start
    evaluate_now()
    if checkpoint is not None:
        save_checkpoint(run, checkpoint)
