"""GPU benchmark for the `mistral-small-3` preset with random weights (same shapes, same speed).

One prepared script for a lent GPU (target: under 8 minutes on an H100), printing one table:
batch-1 decode in bf16 against the HBM-bandwidth bound, int8 weight-only decode, fp8 decode
(`--quant fp8`: fp8 matmuls on Ada/Hopper) against the bound of its own bytes, time to first
token for a 500-token prompt, and aggregate tokens/s at 32 concurrent streams, batched and
with --batch-invariant (each sequence in its own forward pass). The engine's attention
(EngineConfig.attention_backend "auto": FlexAttention over the paged pool on CUDA) is printed,
and a row races FlexAttention against SDPA over gathered blocks on the same streams. Decode
steps replay CUDA graphs by default on CUDA (EngineConfig.decode_graphs); a row compares them
with eager steps at batch 1.

    python benchmarks/gpu.py                      # on a GPU: the real preset
    python benchmarks/gpu.py --scale 16 --device cpu --bandwidth-gbs 20   # CPU smoke run

--scale N divides the layer count and every width by N (head_dim stays 128 where it can),
so the script's whole path is exercised on CPU in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from collections.abc import Callable
from functools import partial

import torch

from levante.config import EngineConfig, ModelConfig, preset
from levante.engine.engine import Engine
from levante.engine.sampling_params import SamplingParams
from levante.errors import ConfigError
from levante.model import Transformer

Row = tuple[str, str, str]  # measure, value, note


def scaled(config: ModelConfig, scale: int) -> ModelConfig:
    """The preset shrunk by `scale` in depth and width, keeping its ratios."""
    if scale == 1:
        return config
    heads = max(4, config.num_heads // scale)
    kv = max(1, heads * config.num_kv_heads // config.num_heads)
    return config.replace(num_layers=max(2, config.num_layers // scale),
                          dim=max(256, config.dim // scale), num_heads=heads, num_kv_heads=kv,
                          ffn_dim=max(512, config.ffn_dim // scale),
                          vocab_size=max(4096, config.vocab_size // scale), max_seq_len=4096)


def random_model(config: ModelConfig, dtype: torch.dtype, device: str) -> Transformer:
    """A Transformer with small random weights, made directly on the device."""
    with torch.device("meta"):
        model = Transformer(config, max_positions=config.max_seq_len).to(dtype)
    model = model.to_empty(device=device)  # allocated in `dtype`: a 24B model never in float32
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    from levante.model import rotary_table

    cos, sin = rotary_table(config, config.max_seq_len)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.to(dtype).eval()


def weight_bytes(model: Transformer) -> int:
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    seen.update({id(b): b.numel() * b.element_size() for n, b in model.named_buffers()
                 if not n.startswith("rope")})
    return sum(seen.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_rate(engine: Engine, *, batch: int, prompt_len: int, new_tokens: int,
                device: str) -> tuple[float, float]:
    """(aggregate decode tokens/s, time to first token in s) for `batch` equal requests."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 10 + prompt_len))
    sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(prompt, params) for _ in range(batch)]
    first = None
    pending = set(ids)
    while pending:
        for out in engine.step():
            if first is None:
                sync(device)
                first = time.perf_counter()
            if out.finished:
                pending.discard(out.request_id)
    sync(device)
    end = time.perf_counter()
    assert first is not None
    return batch * (new_tokens - 1) / (end - first), first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                        help="HBM bandwidth for the bound (H100 SXM: 3350 GB/s)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="rows not started by then are skipped (the table still prints)")
    args = parser.parse_args()
    device = args.device
    config = scaled(preset("mistral-small-3"), args.scale)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}; preset mistral-small-3 / scale {args.scale}: {config.num_layers} "
          f"layers, dim {config.dim}, {config.num_params / 1e9:.2f}B params")
    model = random_model(config, torch.bfloat16, device)
    engine_config = EngineConfig(max_model_len=2048, max_num_seqs=args.streams,
                                 max_num_batched_tokens=2048,
                                 num_kv_blocks=args.streams * 2048 // 16 // 4)
    bound = args.bandwidth_gbs * 1e9 / weight_bytes(model)
    began = time.perf_counter()
    rows: list[Row] = []
    rates: dict[str, float] = {}  # tok/s a later row compares with

    def row(label: str, measure: Callable[[], Row | list[Row]]) -> None:
        """Runs one measurement, printing its row at once; an error or the deadline skips it
        without losing the rows before and after (a lent GPU's minutes are few)."""
        if time.perf_counter() - began > args.deadline_s:
            rows.append((label, "skipped", f"past --deadline-s {args.deadline_s:.0f}"))
        else:
            start = time.perf_counter()
            try:
                measured = measure()
                got = measured if isinstance(measured, list) else [measured]
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                traceback.print_exc()
                got = [(label, "error", f"{type(e).__name__}: {str(e)[:120]}")]
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.extend(got)
            print(f"[{time.perf_counter() - began:6.1f} s, row took "
                  f"{time.perf_counter() - start:.1f} s] {got}", flush=True)

    row("bf16 batch 1, TTFT, 32 streams",
        partial(_bf16_rows, model, engine_config, args, device, bound, rates))
    row("with --batch-invariant",
        partial(_invariant_row, model, engine_config, args, device, rates))
    row("decode graphs vs eager, batch 1",
        partial(_graphs_row, model, engine_config, args, device, bound))
    row("flex vs sdpa", partial(_attention_row, model, engine_config, args, device))
    row("int8 weight kernels, one layer", partial(_int8_kernels_row, config, device))
    row("int8 decode, batch 1", partial(_int8_row, model, engine_config, args, device))
    del model  # now int8; fp8 starts again from a bf16 model, so only one is held at a time
    if device == "cuda":
        torch.cuda.empty_cache()
    row("fp8 decode, batch 1",
        partial(_fp8_row, config, engine_config, args, device, bf16_bound=bound))
    print(f"{'measure':<34}{'value':>16}  note")
    for label, value, note in rows:
        print(f"{label:<34}{value:>16}  {note}")


def _bf16_rows(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
               device: str, bound: float, rates: dict[str, float]) -> list[Row]:
    """Batch-1 decode, TTFT and 32 streams (that rate kept in `rates["batched"]`)."""
    rows = []
    engine = Engine(model, None, engine_config)
    print(f"attention: {engine.runner.attention_backend}"
          f"{' (compiled)' if engine.runner.flex and engine.runner.flex.is_compiled else ''}; "
          f"decode steps: {'CUDA graphs' if engine.runner.graphs else 'eager'}", flush=True)
    decode_rate(engine, batch=1, prompt_len=16, new_tokens=4, device=device)  # warm-up
    rate, _ = decode_rate(engine, batch=1, prompt_len=16, new_tokens=args.new_tokens,
                          device=device)
    rows.append(("bf16 decode, batch 1", f"{rate:.1f} tok/s",
                 f"{rate / bound:.0%} of bound {bound:.1f}"))
    decode_rate(engine, batch=1, prompt_len=500, new_tokens=2, device=device)  # this shape's warm-up
    _, ttft = decode_rate(engine, batch=1, prompt_len=500, new_tokens=2, device=device)
    rows.append(("bf16 TTFT, 500-token prompt", f"{ttft * 1000:.0f} ms", "target <= 100 ms"))
    decode_rate(engine, batch=args.streams, prompt_len=64, new_tokens=4, device=device)
    rate, _ = decode_rate(engine, batch=args.streams, prompt_len=64,
                          new_tokens=args.new_tokens, device=device)
    rates["batched"] = rate
    rows.append((f"bf16 aggregate, {args.streams} streams", f"{rate:.1f} tok/s", ""))
    return rows


def _invariant_row(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
                   device: str, rates: dict[str, float]) -> Row:
    """batch_invariant: each sequence in its own forward pass (exact; the cost of batching)."""
    invariant = Engine(model, None, dataclasses.replace(engine_config, batch_invariant=True))
    split_rate, _ = decode_rate(invariant, batch=args.streams, prompt_len=64,
                                new_tokens=args.new_tokens, device=device)
    batched = rates.get("batched")
    return ("  with --batch-invariant", f"{split_rate:.1f} tok/s",
            f"{split_rate / batched:.2f}x of batched" if batched else "")


def _int8_kernels_row(config: ModelConfig, device: str) -> tuple[str, str, str]:
    """One [ffn, dim] weight at batch 1: bf16 F.linear, the int8 layer's default kernel, and
    the fp8 layer, each against the bytes its weight holds (median of 50 after warm-up)."""
    from levante.quant.fp8 import Fp8Linear
    from levante.quant.linear import Int8Linear

    weight = torch.randn(config.ffn_dim, config.dim, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, config.dim, device=device, dtype=torch.bfloat16)
    layers = {"bf16": lambda v: torch.nn.functional.linear(v, weight),
              "int8": Int8Linear.from_float(weight), "fp8": Fp8Linear.from_float(weight)}
    notes = []
    for name, layer in layers.items():
        times = []
        for i in range(60):
            sync(device)
            start = time.perf_counter()
            layer(x)
            sync(device)
            if i >= 10:
                times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        size = weight.numel() * (2 if name == "bf16" else 1)
        notes.append(f"{name} {median * 1e6:.0f} us ({size / median / 1e9:.0f} GB/s)")
    kernel = layers["int8"].kernel
    return ("int8 weight kernels, one layer", f"int8: {kernel}", "; ".join(notes))


def _attention_row(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
                   device: str) -> tuple[str, str, str]:
    """Aggregate decode with FlexAttention against SDPA over gathered blocks, same streams.

    Off CUDA, flex runs eagerly over the whole pool's score matrix: 2 streams at most there.
    """
    streams = args.streams if device == "cuda" else min(args.streams, 2)
    rates = {}
    for backend in ("flex", "sdpa"):
        config = dataclasses.replace(engine_config, attention_backend=backend)
        try:
            engine = Engine(model, None, config)
        except ConfigError as e:
            return (f"flex vs sdpa, {streams} streams", "n/a", str(e))
        decode_rate(engine, batch=streams, prompt_len=16, new_tokens=4, device=device)
        rates[backend], _ = decode_rate(engine, batch=streams, prompt_len=64,
                                        new_tokens=args.new_tokens, device=device)
        del engine
    return (f"flex vs sdpa, {streams} streams", f"{rates['flex']:.1f} tok/s",
            f"sdpa {rates['sdpa']:.1f} tok/s: flex {rates['flex'] / rates['sdpa']:.2f}x")


def _graphs_row(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
                device: str, bound: float) -> tuple[str, str, str]:
    """Batch-1 decode with the default (CUDA graphs on CUDA) against eager steps."""
    rates = {}
    for mode in ("auto", "off"):
        engine = Engine(model, None, dataclasses.replace(engine_config, decode_graphs=mode))
        decode_rate(engine, batch=1, prompt_len=16, new_tokens=4, device=device)  # capture
        rates[mode], _ = decode_rate(engine, batch=1, prompt_len=16,
                                     new_tokens=args.new_tokens, device=device)
        del engine
    return ("decode graphs vs eager, batch 1", f"{rates['auto']:.1f} tok/s",
            f"eager {rates['off']:.1f} tok/s: {rates['auto'] / rates['off']:.2f}x; "
            + f"{rates['auto'] / bound:.0%} of bound")


def _int8_row(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
              device: str) -> tuple[str, str, str]:
    """int8 weight-only decode through the quantization module, where it is available."""
    try:
        from levante.quant.linear import quantize_model
    except ImportError as e:
        return ("int8 decode, batch 1", "n/a", f"quantization unavailable: {e}")
    quantize_model(model, "int8")
    engine = Engine(model, None, engine_config)
    decode_rate(engine, batch=1, prompt_len=16, new_tokens=4, device=device)
    rate, _ = decode_rate(engine, batch=1, prompt_len=16, new_tokens=args.new_tokens,
                          device=device)
    return ("int8 decode, batch 1", f"{rate:.1f} tok/s", "target >= 150 tok/s on an H100")


def _fp8_row(config: ModelConfig, engine_config: EngineConfig, args: argparse.Namespace,
             device: str, *, bf16_bound: float) -> tuple[str, str, str]:
    """fp8 e4m3 decode (`quantize_model_fp8`, as `--quant fp8` loads) against its HBM bound."""
    from levante.quant.fp8 import quantize_model_fp8

    model = quantize_model_fp8(random_model(config, torch.bfloat16, device))
    kernel = model.model.layers[0].mlp.down_proj.kernel
    engine = Engine(model, None, engine_config)
    decode_rate(engine, batch=1, prompt_len=16, new_tokens=4, device=device)
    rate, _ = decode_rate(engine, batch=1, prompt_len=16, new_tokens=args.new_tokens,
                          device=device)
    bound = args.bandwidth_gbs * 1e9 / weight_bytes(model)
    return (f"fp8 decode, batch 1 ({kernel})", f"{rate:.1f} tok/s",
            f"{rate / bound:.0%} of bound {bound:.1f} ({bound / bf16_bound:.2f}x bf16's)")


if __name__ == "__main__":
    main()
