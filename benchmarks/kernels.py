"""The quantized matmul kernels next to torch float32, per SmolLM2 shape and as a whole model.

Usage: .venv/bin/python benchmarks/kernels.py [--ref smollm2] [--repeats 30] [--rounds 3]
  [--tokens 128] [--threads N] [--skip-model] [--kquant [--shapes 1280x1280,...]]

--kquant runs only part 3 (no model needed): the K-quant kernel, each type of
`kernels.KQUANT_TYPES`, at the Mistral proxy's shapes (`--shapes` picks some) on random
blocks, GEMV (M = 1, GB/s of weight bytes read) and GEMM (M = 256, GOPS = 2 M N K / s), next
to the Q8_0 kernel and `F.linear` in float32 on the same shape, timed interleaved (minimum
over samples). Weights up to a few MB stay in cache between calls (the K = 1280 x N = 131072
head, 94-335 MB, never does).

Part 1, per weight shape of SmolLM2 (Q4_1 layers, Q8_0 tied head), at M = 1 (decode) and
M = 64 (prefill): our kernel vs `F.linear` on the dequantized float32 weight, each the
minimum over `--repeats` interleaved samples (the machine is shared: the minimum is the
least disturbed run), with GB/s of weight bytes read and the tokens/s these matmuls alone
would allow for a whole forward (30 layers x 7 matmuls + the head). Repeating one shape
keeps its weight in cache, so part 1b runs a decode token's 211 matmuls in model order,
each weight once, as decode does.
Part 2, the whole model: one float32 SmolLM2 from `levante.bundle.load`; its q/k/v/o/
gate/up/down and lm_head are swapped between the float nn.Linear and a module calling our
kernel on the GGUF's own blocks; `LLM.generate` greedy at batch 1, rounds interleaved,
best round reported. llama.cpp is not run here (see benchmarks/peers.py); its figures on
this machine were ~82 decode and ~200 prefill tokens/s.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from levante.quant import kernels
from levante.quant.kernels import PackedWeight
from levante.weights.gguf import GGUFFile
from levante.weights.layout import interleaved_to_half

# (label, GGUF tensor of layer 0, how many such matmuls one SmolLM2 forward runs for the
# decode token / for each prefill token: the head only projects a prompt's last token)
SHAPES = [("q, o     576x576", "blk.0.attn_q.weight", 60, 60),
          ("k, v     192x576", "blk.0.attn_k.weight", 60, 60),
          ("gate, up 1536x576", "blk.0.ffn_gate.weight", 60, 60),
          ("down     576x1536", "blk.0.ffn_down.weight", 30, 30),
          ("head     49152x576", "token_embd.weight", 1, 0)]
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = ("The history of astronomy is long and rich. Early observers tracked the motions of "
          "the sun, the moon and the planets, and built calendars around them. ") * 4


def min_time(fns: list[Callable[[], object]], repeats: int, calls: int = 5) -> list[float]:
    """Seconds per call of each fn: min over `repeats` samples of `calls` calls, interleaved."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def pack(gguf: GGUFFile, name: str, num_heads: int | None = None) -> PackedWeight:
    """A tensor's blocks repacked; q/k rows reordered to rotate-half as our loader does."""
    shape = gguf.tensor_shape(name)
    rows = gguf.raw(name).view(shape[0], -1)  # [N, bytes per row]: whole blocks per row
    if num_heads is not None:
        rows = interleaved_to_half(rows, num_heads)
    return kernels.repack(gguf.tensor_type(name), rows, (shape[0], shape[1]))


def shape_table(gguf: GGUFFile, repeats: int) -> None:
    """Part 1: per-shape times at M = 1 and 64 (weights hot in cache) and what they imply."""
    for num_rows in (1, 64):
        print(f"\nM = {num_rows}{'':<14}{'ours ms':>10}{'GB/s':>7}{'f32 ms':>10}{'GB/s':>7}"
              f"{'speedup':>9}")
        totals = [0.0, 0.0]
        for label, name, decode_count, prefill_count in SHAPES:
            w = pack(gguf, name)
            weight = kernels.dequantize_packed(w)
            x = torch.randn(num_rows, w.shape[1])
            ours, f32 = min_time([partial(kernels.qlinear, x, w), partial(F.linear, x, weight)],
                                 repeats)
            count = decode_count if num_rows == 1 else prefill_count
            totals[0] += count * ours
            totals[1] += count * f32
            print(f"{label:<20}{ours * 1e3:>10.3f}{w.nbytes / ours / 1e9:>7.1f}"
                  f"{f32 * 1e3:>10.3f}{weight.nbytes / f32 / 1e9:>7.1f}{f32 / ours:>8.2f}x")
        print(f"{'matmuls/token':<20}{totals[0] * 1e3 / num_rows:>10.3f}{'':>7}"
              f"{totals[1] * 1e3 / num_rows:>10.3f}{'':>7}{totals[1] / totals[0]:>8.2f}x")
        print(f"  => matmul-only bound, weights hot: ours {num_rows / totals[0]:.0f} tokens/s, "
              f"float32 {num_rows / totals[1]:.0f} tokens/s")


def sweep_table(gguf: GGUFFile, repeats: int) -> None:
    """Part 1b: one decode token's 211 matmuls, each weight read once (from DRAM, as in decode)."""
    num_layers = 1 + max(int(n.split(".")[1]) for n in gguf.tensor_names if n.startswith("blk."))
    names = [f"blk.{i}.{t}.weight" for i in range(num_layers) for t in LAYER_TENSORS]
    packed = [pack(gguf, n) for n in [*names, "token_embd.weight"]]
    floats = [kernels.dequantize_packed(w) for w in packed]
    inputs = {k: torch.randn(1, k) for k in {w.shape[1] for w in packed}}

    def sweep(linear: Callable[[torch.Tensor, object], object], weights: list) -> None:
        for w in weights:
            linear(inputs[w.shape[1]], w)

    ours, f32 = min_time([partial(sweep, kernels.qlinear, packed),
                          partial(sweep, F.linear, floats)], max(3, repeats // 5))
    num_bytes = [sum(w.nbytes for w in packed), sum(w.nbytes for w in floats)]
    print(f"\nM = 1, all {len(packed)} matmuls of a token, each weight once (not in cache):")
    print(f"  ours {ours * 1e3:.2f} ms ({num_bytes[0] / ours / 1e9:.1f} GB/s, "
          f"{1 / ours:.0f} tokens/s), float32 {f32 * 1e3:.2f} ms ({num_bytes[1] / f32 / 1e9:.1f} "
          f"GB/s, {1 / f32:.0f} tokens/s): {f32 / ours:.2f}x")


# Part 3: (N, K) of the Mistral proxy: q/o/gate-up input, k/v, ffn up, output head; ffn down.
KQUANT_SHAPES = [(1280, 1280), (256, 1280), (8192, 1280), (131072, 1280), (1280, 8192)]
Q = GGMLQuantizationType
# f16 byte offsets per block (d, dmin), set so that random blocks give finite weights.
SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                Q.Q6_K: (208,), Q.Q8_0: (0,)}


def random_blocks(qtype: GGMLQuantizationType, num_rows: int, num_cols: int) -> torch.Tensor:
    """Random block bytes, each f16 scale set to 2^-10: uint8 [N, row_bytes]."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (num_rows * num_cols // block_size, type_size),
                           dtype=torch.uint8)
    for start in SCALE_FIELDS[qtype]:
        blocks[:, start:start + 2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)
    return blocks.view(num_rows, -1)


def kquant_table(repeats: int, shapes: list[tuple[int, int]]) -> None:
    """Part 3: each K-quant type's kernel vs the Q8_0 kernel vs float32, GB/s and GOPS."""
    ktypes = sorted(kernels.KQUANT_TYPES)
    names = [t.name for t in ktypes] + ["Q8_0", "f32"]
    print(f"\n{'N x K':<14}{'M':>4}" + "".join(f"{n + ' ms':>10}{'':>6}" for n in names))
    for num_rows, num_cols in shapes:
        blocks = [random_blocks(t, num_rows, num_cols) for t in ktypes]
        q8 = kernels.repack(Q.Q8_0, random_blocks(Q.Q8_0, num_rows, num_cols),
                            (num_rows, num_cols))
        f32 = torch.randn(num_rows, num_cols)
        num_bytes = [b.nbytes for b in blocks] + [q8.nbytes, f32.nbytes]
        for num_tokens in (1, 256):
            x = torch.randn(num_tokens, num_cols)
            fns = [*(partial(kernels.kquant_linear, x, b, t) for b, t in zip(blocks, ktypes)),
                   partial(kernels.qlinear, x, q8), partial(F.linear, x, f32)]
            big = num_tokens > 1 or num_rows * num_cols > 1 << 24
            times = min_time(fns, max(3, repeats // 6) if big else repeats, 1 if big else 5)
            cells = ""
            for seconds, size in zip(times, num_bytes):
                rate = (size / seconds / 1e9 if num_tokens == 1
                        else 2 * num_tokens * num_rows * num_cols / seconds / 1e9)
                cells += f"{seconds * 1e3:>10.3f}{rate:>5.0f}{'G' if num_tokens == 1 else 'T'}"
            print(f"{num_rows:>6} x {num_cols:<5}{num_tokens:>4}{cells}")
        del blocks, q8, f32
    print("  G: GB/s of weight bytes read (M = 1); T: GOPS, 2 M N K per second (M = 256)")


class QuantLinear(nn.Module):
    """Stand-in for nn.Linear that computes with a packed GGUF weight."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.weight_packed = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.qlinear(x, self.weight_packed)


def quant_modules(model: nn.Module, gguf: GGUFFile) -> dict[tuple[nn.Module, str], nn.Module]:
    """(parent, attribute) -> QuantLinear for every projection and the head, from the file."""
    config = model.config
    swaps: dict[tuple[nn.Module, str], nn.Module] = {
        (model, "lm_head"): QuantLinear(pack(gguf, "output.weight" if "output.weight"
                                             in gguf.tensor_names else "token_embd.weight"))}
    names = {"q_proj": ("attn_q", config.num_heads), "k_proj": ("attn_k", config.num_kv_heads),
             "v_proj": ("attn_v", None), "o_proj": ("attn_output", None),
             "gate_proj": ("ffn_gate", None), "up_proj": ("ffn_up", None),
             "down_proj": ("ffn_down", None)}
    for i, layer in enumerate(model.model.layers):
        for attr, (gguf_name, heads) in names.items():
            parent = layer.self_attn if attr.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else layer.mlp
            swaps[(parent, attr)] = QuantLinear(pack(gguf, f"blk.{i}.{gguf_name}.weight", heads))
    return swaps


def swap(swaps: dict[tuple[nn.Module, str], nn.Module]) -> dict[tuple[nn.Module, str], nn.Module]:
    """Install `swaps`; return what they replaced (to swap back)."""
    old = {}
    for (parent, attr), module in swaps.items():
        old[(parent, attr)] = getattr(parent, attr)
        setattr(parent, attr, module)
    return old


def model_table(ref: str, num_tokens: int, rounds: int) -> None:
    """Part 2: whole-model greedy decode, float32 vs quantized linears, interleaved rounds."""
    from levante import LLM, SamplingParams
    from levante.bundle import load

    bundle = load(ref, dtype=torch.float32, max_seq_len=2048)
    gguf = GGUFFile(Path(bundle.path))
    llm = LLM(bundle)
    quant = quant_modules(bundle.model, gguf)
    float_modules = {key: getattr(*key) for key in quant}
    prompt_ids = llm.encode_prompt(PROMPT)
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    weights_mb = sum(m.weight_packed.nbytes for m in quant.values()) / 1e6
    print(f"\nwhole model: {ref}, prompt {len(prompt_ids)} tokens, {num_tokens} new, greedy, "
          f"batch 1; quantized linears hold {weights_mb:.0f} MB")
    results: dict[str, list[tuple[float, float]]] = {"float32": [], "q4_1 kernel": []}
    tokens: dict[str, list[int]] = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, modules in (("float32", float_modules), ("q4_1 kernel", quant)):
            swap(modules)
            done = llm.generate(prompt_ids, params)[0]
            tokens[name] = done.token_ids
            if round_index:
                results[name].append((done.prefill_tokens_per_s, done.decode_tokens_per_s))
    swap(float_modules)
    print(f"{'linears':<14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    best = {k: (max(p for p, _ in v), max(d for _, d in v)) for k, v in results.items()}
    for name, (prefill, decode) in best.items():
        print(f"{name:<14}{prefill:>15.1f}{decode:>15.1f}")
    q, f = best["q4_1 kernel"], best["float32"]
    print(f"{'ratio':<14}{q[0] / f[0]:>14.2f}x{q[1] / f[1]:>14.2f}x")
    same = next((i for i, (a, b) in enumerate(zip(tokens["float32"], tokens["q4_1 kernel"]))
                 if a != b), num_tokens)
    print(f"greedy tokens equal to float32's for the first {same} of {num_tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--kquant", action="store_true",
                        help="only part 3: K-quant kernels at the Mistral proxy's shapes")
    parser.add_argument("--shapes", default=None,
                        help="part 3's N x K list, e.g. 1280x1280,1280x8192 (default: all, "
                             "with the 131072 x 1280 head)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from levante.weights.hub import resolve

    assert kernels.available(), "kernel not built: see the log"
    print(f"kernel {kernels.kernel_isa()}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f} (shared machine: minimum of "
          f"{args.repeats} samples per cell)")
    if args.kquant:
        with torch.inference_mode():
            shapes = KQUANT_SHAPES if args.shapes is None else [
                (int(n), int(k)) for n, k in (s.split("x") for s in args.shapes.split(","))]
            kquant_table(args.repeats, shapes)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        return
    path = resolve(args.ref)
    with torch.inference_mode():
        shape_table(GGUFFile(path), args.repeats)
        sweep_table(GGUFFile(path), args.repeats)
    if not args.skip_model:
        model_table(args.ref, args.tokens, args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
