"""`levante finetune | quantize | plan`: adapt a model, shrink its weights, plan its memory."""

# No `from __future__ import annotations`: typer reads the commands' annotations at every start,
# and evaluating them from strings cost 30-40 ms of each command (see levante.cli).

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from levante.cli.typer_app import Ref, app, console, err_console, fail, parse_size
from levante.errors import LevanteError


@app.command()
def finetune(
    ref: Ref,
    data: Annotated[Path, typer.Option(help="chat JSONL (OpenAI `messages`, optional `tools`)")],
    out: Annotated[Path, typer.Option(help="folder for the PEFT adapter (and checkpoint/, merged/)")],
    mix: Annotated[list[str] | None, typer.Option(
        help="FILE:SHARE blends another JSONL at that share, e.g. general.jsonl:0.2 (repeatable)")] = None,
    eval_path: Annotated[Path | None, typer.Option(
        "--eval", help="held-out JSONL: loss/perplexity before, during, after; side-by-side answers")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 64,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank)")] = None,
    dropout: Annotated[float, typer.Option()] = 0.05,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-4,
    schedule: Annotated[str, typer.Option(help="cosine | linear | constant (after warmup)")] = "cosine",
    warmup_ratio: Annotated[float, typer.Option()] = 0.05,
    epochs: Annotated[int, typer.Option()] = 1,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps; overrides --epochs")] = None,
    batch_size: Annotated[int, typer.Option()] = 4,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    max_seq_len: Annotated[int, typer.Option(help="longer sequences are truncated (counted)")] = 2048,
    target_modules: Annotated[str, typer.Option(help="comma-separated linears to adapt")] =
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 (the frozen base)")] = "float32",
    quant: Annotated[str | None, typer.Option(help="QLoRA: int8 | int4 frozen base")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option()] = True,
    eval_every: Annotated[int | None, typer.Option(help="steps between held-out evaluations")] = None,
    save_every: Annotated[int | None, typer.Option(help="steps between resumable checkpoints")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    merge: Annotated[bool, typer.Option(help="also write a merged HF checkpoint to OUT/merged")] = False,
    strict: Annotated[bool, typer.Option(help="a malformed data line is fatal")] = False,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """LoRA/QLoRA fine-tune REF on chat JSONL; writes a PEFT adapter HF peft can load."""
    from levante.finetune.job import finetune as run_finetune
    from levante.finetune.train import TrainConfig

    try:
        config = TrainConfig(
            rank=rank, alpha=alpha, dropout=dropout, lr=lr, schedule=schedule,
            warmup_ratio=warmup_ratio, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
            grad_accum=grad_accum, max_seq_len=max_seq_len, dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
            eval_every=eval_every, save_every=save_every, seed=seed, quant=quant)
        result = run_finetune(ref, data, out, config=config, mix=mix or (), eval_path=eval_path,
                              merge=merge, strict=strict, resume=resume,
                              console=(err_console if as_json else console).get())
    except LevanteError as e:
        fail(e)
    before, after = result.eval_before, result.eval_after
    if as_json:
        sys.stdout.write(json.dumps({
            "adapter": str(result.adapter_dir),
            "merged": str(result.merged_dir) if result.merged_dir else None,
            "steps": result.train.num_steps, "seconds": result.train.seconds,
            "train_loss": result.train.history[-1]["loss"] if result.train.history else None,
            "eval": [{"step": s, "loss": e.loss, "perplexity": e.perplexity}
                     for s, e in result.train.evals],
            "skipped_lines": result.data.problems, "truncated": result.data.num_truncated,
            "comparisons": [vars(c) for c in result.comparisons]}) + "\n")
        return
    if before is not None and after is not None:
        console.print(f"held-out loss {before.loss:.4f} -> {after.loss:.4f} "
                      f"(perplexity {before.perplexity:.2f} -> {after.perplexity:.2f})")
    if result.comparisons:
        from rich.table import Table

        table = Table("reference", "base", "adapter", title="held-out prompts", show_lines=True)
        for c in result.comparisons:
            table.add_row(c.reference, c.base.strip(), c.adapter.strip())
        console.print(table)
    console.print(f"adapter -> {result.adapter_dir}"
                  + (f"; merged -> {result.merged_dir}" if result.merged_dir else ""))


@app.command()
def quantize(
    src: Ref,
    to: Annotated[str, typer.Option("--to", help="GGUF as llama.cpp writes it: q4_k_m | q3_k_m "
                                                 "| q5_k_m | q6_k | q8_0 | q4_0 | q4_1 | f16 | "
                                                 "bf16; Levante safetensors: int8 | int4")],
    out: Annotated[Path, typer.Option("--out", help="output .gguf file, or folder for int8/int4")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Write SRC (safetensors or GGUF) as a quantized GGUF file or a Levante int8/int4 folder."""
    from levante.quant.export import quantize_checkpoint

    try:
        result = quantize_checkpoint(src, to=to, out=out, progress=not as_json)
    except LevanteError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps({
            "path": str(result.path), "format": result.format,
            "num_tensors": result.num_tensors, "num_bytes": result.num_bytes,
            "tensor_types": result.tensor_types, "seconds": result.seconds}) + "\n")
        return
    types = ", ".join(f"{count} {name}" for name, count in sorted(result.tensor_types.items()))
    console.print(f"wrote {result.path}: {result.num_bytes / 1e6:,.1f} MB, {types}, "
                  f"in {result.seconds:.1f} s")


@app.command()
def plan(
    ref: Annotated[str, typer.Argument(help="a preset (mistral-small-3, smollm2) or model ref")],
    quant: Annotated[str | None, typer.Option(help="f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | "
                                                   "q4_k_m | q4_0 | q4_1 | q3_k_m | int8 | "
                                                   "int4 | fp8 (default: as stored, bf16 for a "
                                                   "preset)")] = None,
    context: Annotated[int | None, typer.Option(help="tokens per sequence (default: the "
                                                     "model's context)")] = None,
    batch: Annotated[int, typer.Option(help="sequences at once")] = 1,
    memory: Annotated[str | None, typer.Option(help="memory per device, e.g. 24GB")] = None,
    tensor_parallel: Annotated[int, typer.Option("--tensor-parallel",
                                                 help="devices sharing the model")] = 1,
    kv_cache_dtype: Annotated[str, typer.Option(
        help="float16 | bfloat16 | float32 | q8_0 (as the engine's --kv-cache-dtype)")
    ] = "float16",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Memory a model needs: weights per format, KV cache, overhead, and whether it fits."""
    from levante.plan import plan as make_plan

    try:
        result = make_plan(ref, quant=quant, context=context, batch=batch,
                           memory=parse_size(memory), tensor_parallel=tensor_parallel,
                           kv_cache_dtype=kv_cache_dtype)
    except LevanteError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    has_post = any(row.post_label for row in result.rows)
    from rich.table import Table

    table = Table("format", "bits/weight", "weights GB", *(["launch post"] if has_post else []),
                  title=f"{ref}: {result.num_params / 1e9:.2f} B parameters")
    for row in result.rows:
        post = [f"{row.post_label} ~{row.post_bytes / 1e9:.0f} GB"
                if row.post_label and row.post_bytes is not None else ""]
        table.add_row(row.format, f"{row.bits_per_weight:.2f}", f"{row.weights_bytes / 1e9:.2f}",
                      *(post if has_post else []))
    console.print(table)
    per_device = " per device" if result.tensor_parallel > 1 else ""
    console.print(
        f"{result.quant} weights {result.weights_bytes / 1e9:.2f} GB{per_device}"
        + (f" ({result.mapped_bytes / 1e9:.2f} GB of it the memory-mapped embedding, resident "
           "as tokens are looked up)" if result.mapped_bytes else "")
        + "; KV cache "
        f"{result.kv_bytes_per_token / 1024:.0f} KiB/token x {result.context} tokens x "
        f"{result.batch} = {result.kv_cache_bytes / 1e9:.2f} GB; overhead "
        f"{result.overhead_bytes / 1e9:.2f} GB; total {result.total_bytes / 1e9:.2f} GB")
    if result.memory is not None:
        verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
        console.print(f"{verdict} in {result.memory / 1e9:.1f} GB; longest context that fits: "
                      f"{result.max_context} tokens (model max {result.model_max_context})")


# `levante eval --task perplexity` is already wired in cli/measure.py to
# `evaluate_perplexity(ref, data, quant=..., load_config=...)`; to expose the window, add there:
#     window: Annotated[int, typer.Option(help="perplexity: tokens per window")] = 512,
#     stride: Annotated[int, typer.Option(help="perplexity: tokens between windows")] = 256,
# and pass `window=window, stride=stride` to evaluate_perplexity.

