"""One `levante finetune` run: load the base, build the data, train, compare, save, merge."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console

from levante.bundle import Bundle, load
from levante.config import EngineConfig
from levante.errors import ConfigError
from levante.finetune.adapters import load_adapter, save_adapter, save_merged
from levante.finetune.data import (
    Conversation,
    DataReport,
    Example,
    load_examples,
    mix_examples,
    parse_mix,
    read_conversations,
)
from levante.finetune.loss import EvalResult
from levante.finetune.train import TrainConfig, TrainResult, add_lora, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Comparison:
    """One held-out prompt answered by the base and by base + adapter (greedy)."""

    prompt: str
    reference: str
    base: str
    adapter: str


@dataclass
class FinetuneResult:
    """Where the adapter (and merged model) went, and what training and evaluation measured."""

    adapter_dir: Path
    train: TrainResult
    data: DataReport
    merged_dir: Path | None = None
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def eval_before(self) -> EvalResult | None:
        """Held-out loss before training."""
        return self.train.evals[0][1] if self.train.evals else None

    @property
    def eval_after(self) -> EvalResult | None:
        """Held-out loss after training."""
        return self.train.evals[-1][1] if self.train.evals else None


def build_examples(bundle: Bundle, data: Path, *, mix: Sequence[str] = (), max_seq_len: int,
                   strict: bool = False, seed: int = 0) -> tuple[list[Example], DataReport]:
    """Training examples of `data` with each `--mix FILE:SHARE` blended in."""
    if bundle.chat_format is None:
        raise ConfigError(f"{bundle.name} has no chat format; fine-tuning needs one to encode "
                          "conversations")
    report = DataReport()
    eos_ids = bundle.tokenizer.eos_ids
    examples = load_examples(data, bundle.chat_format, eos_ids=eos_ids, max_seq_len=max_seq_len,
                             strict=strict, report=report)
    extras = []
    for spec in mix:
        path, share = parse_mix(spec)
        extra = load_examples(path, bundle.chat_format, eos_ids=eos_ids,
                              max_seq_len=max_seq_len, strict=strict, report=report)
        extras.append((str(path), extra, share))
    return mix_examples(examples, extras, seed=seed, report=report), report


def compare_answers(bundle: Bundle, peft_model: PeftModel, conversations: Sequence[Conversation],
                    *, max_tokens: int = 64) -> list[Comparison]:
    """Greedy answers to each conversation's last prompt, without and with the adapter.

    The prompt is everything before the last assistant message (which is the reference).
    Both runs go through the engine: the LoRA layers sit inside `bundle.model`.
    """
    from levante.engine.sampling_params import SamplingParams
    from levante.llm import LLM

    assert bundle.chat_format is not None
    prompts, references = [], []
    for conversation in conversations:
        last = max(i for i, m in enumerate(conversation.messages) if m.get("role") == "assistant")
        prompts.append(bundle.chat_format.encode(conversation.messages[:last],
                                                 tools=conversation.tools))
        references.append(str(conversation.messages[last].get("content") or ""))
    model = peft_model.get_base_model()
    model.eval()
    engine_config = EngineConfig(  # KV pool sized for exactly these prompts
        max_model_len=min(bundle.config.max_seq_len, max(map(len, prompts)) + max_tokens),
        max_num_seqs=len(prompts),
        enable_prefix_caching=False)  # same prompts, base then adapter: their KV differ
    llm = LLM(dataclasses.replace(bundle, model=model), engine_config=engine_config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with peft_model.disable_adapter():
        base = [c.text for c in llm.generate(prompts, params)]
    tuned = [c.text for c in llm.generate(prompts, params)]
    texts = [bundle.tokenizer.decode(p, skip_special=False) for p in prompts]
    return [Comparison(*row) for row in zip(texts, references, base, tuned)]


def finetune(ref: str, data: Path, out: Path, *, config: TrainConfig,
             mix: Sequence[str] = (), eval_path: Path | None = None, merge: bool = False,
             strict: bool = False, resume: bool = False, num_compare: int = 5,
             console: Console | None = None) -> FinetuneResult:
    """Train a LoRA adapter for `ref` on chat JSONL `data`; write it (and a merged model) to `out`.

    Held-out `eval_path` gives loss/perplexity before, during and after, and a side-by-side
    of base vs adapter answers on its first `num_compare` conversations.
    """
    say = console.print if console is not None else (lambda *_, **__: None)
    bundle = load(ref, dtype=DTYPES[config.dtype])
    examples, report = build_examples(bundle, data, mix=mix, max_seq_len=config.max_seq_len,
                                      strict=strict, seed=config.seed)
    eval_examples: list[Example] = []
    if eval_path is not None:
        eval_examples = load_examples(eval_path, bundle.chat_format,  # type: ignore[arg-type]
                                      eos_ids=bundle.tokenizer.eos_ids,
                                      max_seq_len=config.max_seq_len, strict=strict,
                                      report=report)
    for line in report.lines(config.max_seq_len):
        say(line, highlight=False, markup=False)
    peft_model = add_lora(bundle.model, config)  # QLoRA: also quantizes the frozen base
    pad_id = min(bundle.tokenizer.eos_ids) if bundle.tokenizer.eos_ids else 0
    out = Path(out)
    result = train(peft_model, examples, config, pad_id=pad_id, eval_examples=eval_examples,
                   out_dir=out, resume=resume, console=console)
    save_adapter(peft_model, out, base_ref=ref)
    outcome = FinetuneResult(out, result, report)
    if eval_path is not None and num_compare:
        held_out = read_conversations(eval_path, strict=strict)[:num_compare]
        outcome.comparisons = compare_answers(bundle, peft_model, held_out)
    if merge:
        outcome.merged_dir = merge_adapter(ref, out, out / "merged", dtype=DTYPES[config.dtype])
    return outcome


def merge_adapter(ref: str, adapter_dir: Path, out_dir: Path, *,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Load `ref` unquantized, apply the adapter, fold it into the weights, save an HF folder.

    Always from the full-precision base, so a QLoRA adapter merges without quantization error.
    """
    bundle = load(ref, dtype=dtype)
    merged = load_adapter(bundle.model, adapter_dir).merge_and_unload()
    return save_merged(merged, bundle, out_dir)
