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
    parser.add_argument("--skip", default="", help="rows to leave out, comma-separated: "
                        "graphs, invariant, attention, kernels, configs")
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

    skip = set(filter(None, args.skip.split(",")))
    row("bf16 batch 1, TTFT, 32 streams",
        partial(_bf16_rows, model, engine_config, args, device, bound, rates))
    for name, label, measure in (
            ("graphs", "decode graphs vs eager, batch 1",
             partial(_graphs_row, model, engine_config, args, device, bound)),
            ("invariant", "with --batch-invariant",
             partial(_invariant_row, model, engine_config, args, device, rates)),
            ("attention", "flex vs sdpa", partial(_attention_row, model, engine_config, args,
                                                  device)),
            ("kernels", "8-bit and 4-bit kernels, one layer",
             partial(_kernels_rows, config, device)),
            ("configs", "int8 kernel configs", partial(_configs_rows, config, device))):
        if name not in skip:
            row(label, measure)
    # each format from a fresh bf16 model (int8/int4 quantize in place), one held at a time
    for fmt in ("int8", "fp8", "int4"):
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        model = random_model(config, torch.bfloat16, device)
        row(f"{fmt} batch 1, TTFT, {args.streams} streams",
            partial(_quantized_rows, fmt, model, engine_config, args, device, bf16_bound=bound,
                    rates=rates))
    _print_tuned()
    print(f"{'measure':<34}{'value':>16}  note")
    for label, value, note in rows:
        print(f"{label:<34}{value:>16}  {note}")


def _print_tuned() -> None:
    """The config the Triton autotuner chose for each shape it met."""
    import sys

    kernels = sys.modules.get("levante.quant.triton_kernels")
    for name in ("gemv_tuned", "gemm_tuned", "int4_gemv_tuned", "int4_gemm_tuned"):
        for key, cfg in getattr(getattr(kernels, name, None), "cache", {}).items():
            print(f"tuned {name} {key}: {cfg}")


def _bf16_rows(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
               device: str, bound: float, rates: dict[str, float]) -> list[Row]:
    """Batch-1 decode, TTFT and 32 streams (that rate kept in `rates["batched"]`)."""
    engine = Engine(model, None, engine_config)
    print(f"attention: {engine.runner.attention_backend}"
          f"{' (compiled)' if engine.runner.flex and engine.runner.flex.is_compiled else ''}; "
          f"decode steps: {'CUDA graphs' if engine.runner.graphs else 'eager'}", flush=True)
    rate, ttft, batched = _decode_rates(engine, args, device)
    rates["batched"] = batched
    return [("bf16 decode, batch 1", f"{rate:.1f} tok/s", f"{rate / bound:.0%} of bound {bound:.1f}"),
            ("bf16 TTFT, 500-token prompt", f"{ttft * 1000:.0f} ms", "target <= 100 ms"),
            (f"bf16 aggregate, {args.streams} streams", f"{batched:.1f} tok/s", "")]


def _decode_rates(engine: Engine, args: argparse.Namespace, device: str
                  ) -> tuple[float, float, float]:
    """(batch-1 decode tok/s, TTFT of a 500-token prompt in s, aggregate tok/s of
    args.streams streams), each shape run once unmeasured first (tuning, graph capture)."""
    decode_rate(engine, batch=1, prompt_len=16, new_tokens=4, device=device)
    rate, _ = decode_rate(engine, batch=1, prompt_len=16, new_tokens=args.new_tokens,
                          device=device)
    decode_rate(engine, batch=1, prompt_len=500, new_tokens=2, device=device)
    _, ttft = decode_rate(engine, batch=1, prompt_len=500, new_tokens=2, device=device)
    decode_rate(engine, batch=args.streams, prompt_len=64, new_tokens=4, device=device)
    batched, _ = decode_rate(engine, batch=args.streams, prompt_len=64,
                             new_tokens=args.new_tokens, device=device)
    return rate, ttft, batched


def _invariant_row(model: Transformer, engine_config: EngineConfig, args: argparse.Namespace,
                   device: str, rates: dict[str, float]) -> Row:
    """batch_invariant: each sequence in its own forward pass (exact; the cost of batching)."""
    invariant = Engine(model, None, dataclasses.replace(engine_config, batch_invariant=True))
    split_rate, _ = decode_rate(invariant, batch=args.streams, prompt_len=64,
                                new_tokens=args.new_tokens, device=device)
    batched = rates.get("batched")
    return ("  with --batch-invariant", f"{split_rate:.1f} tok/s",
            f"{split_rate / batched:.2f}x of batched" if batched else "")


def _kernels_rows(config: ModelConfig, device: str) -> list[Row]:
    """One [ffn, dim] weight (gate or up) at 1 and 256 tokens: bf16 `F.linear` against each
    quantized layer's default kernel, and fp8's `_scaled_mm` forced at batch 1; each against
    the bytes its weight holds (median of 50 calls after 10, the first tunes the kernel)."""
    from levante.quant import fp8
    from levante.quant.linear import Int4Linear, Int8Linear

    weight = torch.randn(config.ffn_dim, config.dim, device=device, dtype=torch.bfloat16) * 0.02
    fp8_layer = fp8.Fp8Linear.from_float(weight)
    layers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bf16": lambda v: torch.nn.functional.linear(v, weight),
        "int8": Int8Linear.from_float(weight), "fp8": fp8_layer,
        "int4": Int4Linear.from_float(weight)}
    if fp8_layer.kernel == "scaled_mm":
        layers["fp8 scaled_mm"] = partial(fp8._scaled_matmul, codes=fp8_layer.codes,
                                          scales=fp8_layer.scales)
    if device == "cuda":
        layers["int4 tinygemm"] = Int4Linear.from_float(weight, kernel="packed")
    sizes = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "fp8 scaled_mm": 1.0, "int4": 0.5 + 4 / 32,
             "int4 tinygemm": 0.5 + 4 / 32}
    rows = []
    for tokens in (1, 256):
        x = torch.randn(tokens, config.dim, device=device, dtype=torch.bfloat16)
        notes = []
        for name, layer in layers.items():
            median = _median_time(partial(layer, x), device, calls=50, warmup=10)
            size = weight.numel() * sizes[name]
            notes.append(f"{name} {median * 1e6:.0f} us ({size / median / 1e9:.0f} GB/s)")
        kernels = ", ".join(f"{n}: {getattr(layers[n], 'kernel', '')}" for n in ("int8", "fp8", "int4"))
        rows.append((f"one {config.ffn_dim}x{config.dim} layer, {tokens} tokens", kernels,
                     "; ".join(notes)))
    return rows


def _configs_rows(config: ModelConfig, device: str) -> list[Row]:
    """Each config of the Triton kernels on int8 codes (what the autotuner chooses from), at
    1 token on gate/up's shape [ffn, dim] and down's [dim, ffn], at 16 and 256 tokens on
    gate/up's; against the bytes of the codes (median of 30 calls after 5)."""
    from levante.quant import triton_kernels as tk
    from levante.quant.triton_matmul import cdiv, m_bucket

    rows = []
    for n, k, tokens in ((config.ffn_dim, config.dim, 1), (config.dim, config.ffn_dim, 1),
                         (config.ffn_dim, config.dim, 16), (config.ffn_dim, config.dim, 256)):
        codes = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        scales = torch.rand(n, device=device)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        out = torch.empty(tokens, n, device=device, dtype=torch.bfloat16)
        configs = tk.GEMV_CONFIGS if tokens == 1 else tk._prune_gemm(
            tk.GEMM_CONFIGS, {"M_BUCKET": m_bucket(tokens)})
        notes = []
        for cfg in configs:
            meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if tokens == 1:
                launch = partial(tk.gemv[(cdiv(n, meta["BLOCK_N"]),)], x, codes, scales, out,
                                 n, k, **meta)
            else:
                launch = partial(tk.gemm[(cdiv(tokens, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))],
                                 x, codes, scales, out, tokens, n, k, x.stride(0), out.stride(0),
                                 m_bucket(tokens), **meta)
            median = _median_time(launch, device)
            flags = "".join(f"/{name.lower()}" for name in ("MAGIC", "SWAP") if cfg.kwargs.get(name))
            notes.append(f"{'x'.join(str(v) for key, v in cfg.kwargs.items() if key.startswith('BLOCK'))}"
                         f"/w{cfg.num_warps}s{cfg.num_stages}{flags} {median * 1e6:.0f} us "
                         f"{n * k / median / 1e9:.0f} GB/s")
        rows.append((f"int8 configs, {n}x{k}, {tokens} tokens", "", "; ".join(notes)))
    rows.extend(_int4_configs_rows(config, device))
    return rows


def _int4_configs_rows(config: ModelConfig, device: str) -> list[Row]:
    """Each config of the int4 Triton kernels (groups of 32) on gate/up's shape, at 1 and 256
    tokens, against the bytes of codes, scales and zeros."""
    from levante.quant import triton_kernels as tk
    from levante.quant.linear import Int4Linear
    from levante.quant.triton_matmul import cdiv, m_bucket

    n, k, group = config.ffn_dim, config.dim, 32
    layer = Int4Linear.from_float(torch.randn(n, k, device=device) * 0.02, kernel="triton")
    packed, sz = layer.packed_0, layer.scales_and_zeros_0
    nbytes = packed.numel() + sz.numel() * 2
    rows = []
    for tokens in (1, 256):
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        out = torch.empty(tokens, n, device=device, dtype=torch.bfloat16)
        configs = tk._prune_int4(tk.INT4_GEMV_CONFIGS if tokens == 1 else tk.INT4_GEMM_CONFIGS,
                                 {} if tokens == 1 else {"M_BUCKET": m_bucket(tokens)},
                                 GROUP=group)
        notes = []
        for cfg in configs:
            meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if tokens == 1:
                launch = partial(tk.int4_gemv[(cdiv(n, meta["BLOCK_N"]),)], x, packed, sz, out,
                                 n, k, GROUP=group, **meta)
            else:
                launch = partial(
                    tk.int4_gemm[(cdiv(tokens, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))],
                    x, packed, sz, out, tokens, n, k, x.stride(0), out.stride(0),
                    m_bucket(tokens), GROUP=group, **meta)
            median = _median_time(launch, device)
            notes.append(f"{'x'.join(str(v) for v in cfg.kwargs.values())}/w{cfg.num_warps}"
                         f"s{cfg.num_stages} {median * 1e6:.0f} us {nbytes / median / 1e9:.0f} GB/s")
        rows.append((f"int4 configs, {n}x{k}, {tokens} tokens", "", "; ".join(notes)))
    return rows


def _median_time(launch: Callable[[], object], device: str, calls: int = 30,
                 warmup: int = 5) -> float:
    """Median seconds of `calls` calls after `warmup` unmeasured ones."""
    times = []
    for i in range(calls + warmup):
        sync(device)
        start = time.perf_counter()
        launch()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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


def _quantized_rows(fmt: str, model: Transformer, engine_config: EngineConfig,
                    args: argparse.Namespace, device: str, *, bf16_bound: float,
                    rates: dict[str, float]) -> list[Row]:
    """`fmt` ("int8", "int4": `quantize_model`; "fp8": `quantize_model_fp8`, as `--quant`
    loads) decoding at batch 1 against its own HBM bound, TTFT and the streams' aggregate."""
    from levante.quant.fp8 import quantize_model_fp8
    from levante.quant.linear import quantize_model

    if fmt == "fp8":
        quantize_model_fp8(model)
    else:
        quantize_model(model, fmt)  # int4: its default groups of 32
    kernel = model.model.layers[0].mlp.down_proj.kernel
    bound = args.bandwidth_gbs * 1e9 / weight_bytes(model)
    rate, ttft, streams = _decode_rates(Engine(model, None, engine_config), args, device)
    batched = rates.get("batched")
    note = (f"{rate / bound:.0%} of bound {bound:.1f} ({bound / bf16_bound:.2f}x bf16's); "
            f"{rate * args.bandwidth_gbs / bound:.0f} GB/s")
    return [(f"{fmt} decode, batch 1 ({kernel})", f"{rate:.1f} tok/s", note),
            (f"{fmt} TTFT, 500-token prompt", f"{ttft * 1000:.0f} ms", ""),
            (f"{fmt} aggregate, {args.streams} streams", f"{streams:.1f} tok/s",
             f"{streams / batched:.2f}x bf16's" if batched else "")]


if __name__ == "__main__":
    main()
