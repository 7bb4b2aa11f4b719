"""Prefill attention: the batch-invariant paged kernel next to gather + SDPA, in one run.

Usage: .venv/bin/python benchmarks/attention.py [--ref smollm2] [--prompt-lens 500,2000]
  [--proxy PATH] [--proxy-len 256] [--rounds 3] [--threads 2] [--skip-model]

Part 1, whole model: prefill tokens/s of `LLM.generate(ids, max_tokens=1)` (the prompt in
chunks of max_num_batched_tokens = 512) with `PagedAttention.attend` on the compiled kernel
(`kernels.paged_attention`, the CPU float32 default) and on gather + SDPA (what CPU prefill
used before, and what other devices and dtypes use), rounds interleaved, best round kept.
The Mistral proxy (head_dim 128, 8 heads, 2 KV heads) runs too if its GGUF is there.
Part 2, attention alone: one layer's `attend` over a prompt's chunks on random q/k/v at the
model's shapes, the same two paths, minimum over interleaved samples.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from levante.config import ModelConfig
from levante.engine.kv_cache import KVCache
from levante.engine.paged_attention import build_paged_attention
from levante.quant import kernels

PROMPT_WORDS = ("The history of astronomy is long and rich. Early observers tracked the sun, "
                "the moon and the planets, and built calendars around their motions. ")
PROXY = Path.home() / ".cache" / "levante" / "proxy" / "proxy-q8_0.gguf"
CHUNK = 512  # EngineConfig.max_num_batched_tokens' default


@contextmanager
def sdpa_path() -> Iterator[None]:
    """`attend` as without the kernel: gather each sequence's blocks, then SDPA."""
    real = kernels.paged_attention
    kernels.paged_attention = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        kernels.paged_attention = real  # type: ignore[assignment]


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each run's best (largest) figure over rounds, the runs taking turns."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def prefill_tps(llm, ids: list[int]) -> float:
    from levante import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(ids, params)
    return len(ids) / (time.perf_counter() - start)


def model_rows(ref: str, prompt_lens: list[int], rounds: int) -> list[tuple[str, float, float]]:
    """(label, kernel tok/s, SDPA tok/s) per prompt length for one model."""
    from levante import LLM

    llm = LLM(ref, max_model_len=max(prompt_lens) + 16)
    ids = llm.tokenizer.encode(PROMPT_WORDS * (max(prompt_lens) // 20 + 1))
    prefill_tps(llm, ids[:32])  # warm-up (builds the kernels if needed)

    def via_sdpa(prompt: list[int]) -> float:
        with sdpa_path():
            return prefill_tps(llm, prompt)

    rows = []
    for n in prompt_lens:
        prompt = ids[:n]
        best = interleaved({"kernel": lambda: prefill_tps(llm, prompt),  # noqa: B023
                            "sdpa": lambda: via_sdpa(prompt)}, rounds)  # noqa: B023
        rows.append((f"{Path(str(ref)).name[:28]} {n}", best["kernel"], best["sdpa"]))
    return rows


def attention_ms(config: ModelConfig, prompt_len: int, samples: int) -> tuple[float, float]:
    """One layer's attention over a prompt in chunks of CHUNK: (kernel ms, SDPA ms)."""
    block_size = 16
    num_blocks = -(-prompt_len // block_size)
    cache = KVCache(config, num_blocks=num_blocks + 1, block_size=block_size,
                    dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(num_blocks + 1, generator=gen)[:num_blocks].tolist()
    steps = []
    for start in range(0, prompt_len, CHUNK):
        n = min(CHUNK, prompt_len - start)
        attention = build_paged_attention(cache, block_tables=[table],
                                          context_lens=[start + n], query_lens=[n])
        q = torch.randn(n, config.num_heads, config.head_dim, generator=gen)
        kv = torch.randn(2, n, config.num_kv_heads, config.head_dim, generator=gen)
        steps.append((attention, q, kv))

    def once() -> float:
        start = time.perf_counter()
        for attention, q, kv in steps:
            attention.attend(0, q, kv[0], kv[1])
        return (time.perf_counter() - start) * 1e3

    def via_sdpa() -> float:
        with sdpa_path():
            return once()

    best = interleaved({"kernel": lambda: 1 / once(), "sdpa": lambda: 1 / via_sdpa()}, samples)
    return 1 / best["kernel"], 1 / best["sdpa"]


def whole_model(args: argparse.Namespace, prompt_lens: list[int]) -> None:
    """Part 1: prints prefill tokens/s per model and prompt length, both paths."""
    rows = model_rows(args.ref, prompt_lens, args.rounds)
    if Path(args.proxy).exists():
        rows += model_rows(args.proxy, [args.proxy_len], args.rounds)
    else:
        print(f"(no Mistral proxy at {args.proxy}: skipped)")
    print(f"\nprefill, whole model (best of {args.rounds} interleaved rounds)")
    print(f"{'model, prompt tokens':<34}{'kernel tok/s':>13}{'SDPA tok/s':>12}{'ratio':>8}")
    for label, ours, sdpa in rows:
        print(f"{label:<34}{ours:>13.1f}{sdpa:>12.1f}{ours / sdpa:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--prompt-lens", default="500,2000")
    parser.add_argument("--proxy", default=str(PROXY))
    parser.add_argument("--proxy-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true", help="part 2 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    if not kernels.available():
        raise SystemExit("the compiled kernels are not built here: nothing to compare")
    print(f"{torch.get_num_threads()} threads, kernel ISA {kernels.kernel_isa()}, load average "
          f"{os.getloadavg()[0]:.2f} (another busy process skews these figures)", flush=True)

    if not args.skip_model:
        whole_model(args, prompt_lens)

    shapes = {"SmolLM2 (9 x 64, 3 KV)": ModelConfig(
                  vocab_size=1, dim=576, num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64,
                  ffn_dim=1),
              "Mistral (8 x 128, 2 KV)": ModelConfig(
                  vocab_size=1, dim=1024, num_layers=1, num_heads=8, num_kv_heads=2,
                  head_dim=128, ffn_dim=1)}
    print(f"\nattention alone, one layer, prompt in chunks of {CHUNK} (min of 5 samples)")
    print(f"{'heads, prompt tokens':<34}{'kernel ms':>13}{'SDPA ms':>12}{'ratio':>8}")
    for name, config in shapes.items():
        for n in sorted({*prompt_lens, args.proxy_len}):
            ours, sdpa = attention_ms(config, n, 5)
            print(f"{name + ' ' + str(n):<34}{ours:>13.2f}{sdpa:>12.2f}{sdpa / ours:>7.2f}x")
    print("(ratio: kernel speed / SDPA speed; above 1 the kernel is faster)")


if __name__ == "__main__":
    main()
