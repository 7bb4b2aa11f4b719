"""Levante next to llama.cpp on the same GGUF, same prompt, same machine, in one run.

Prints: engine | prefill tok/s | decode tok/s | TTFT (500-token prompt) | 8-stream aggregate,
and the ratios Levante / llama.cpp. llama.cpp runs through llama-cpp-python in its own
cached venv under $LEVANTE_HOME/peers/llama-cpp (the first run builds it from source: about
10 minutes on 2 cores). Both use the same thread count; rounds are interleaved because this
machine's speed drifts, and the best round of each is kept.

    .venv/bin/python benchmarks/peers.py [--ref smollm2] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
PROMPT_WORDS = ("The history of astronomy is long and rich. Early observers tracked the sun, "
                "the moon and the planets, and built calendars around their motions. ")

LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, prompt_len, new_tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512, verbose=False)
words = sys.stdin.read()
ids = llm.tokenize(words.encode(), add_bos=False)[:prompt_len]
out = []
for _ in range(rounds):
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    token = llm.sample(temp=0.0)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode = time.perf_counter() - start
    out.append({"prefill_tps": len(ids) / prefill, "ttft_s": prefill,
                "decode_tps": (new_tokens - 1) / decode})
print(json.dumps(out))
"""


def llama_python() -> Path:
    """The peer venv's python, building llama-cpp-python there on first use."""
    from levante.weights.store import levante_home

    venv = levante_home() / "peers" / "llama-cpp"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} in {venv} (about 10 minutes)...",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True,
                   env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    return python


def run_llama(path: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    python = llama_python()
    result = subprocess.run(
        [str(python), "-c", LLAMA_SCRIPT, str(path), str(args.threads), str(args.prompt_len),
         str(args.tokens), "1"], input=PROMPT_WORDS * 60, capture_output=True, text=True,
        check=True)
    return json.loads(result.stdout)


def run_levante(llm, prompt_ids: list[int], args: argparse.Namespace) -> dict[str, float]:
    from levante import SamplingParams

    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    done = llm.generate(prompt_ids, params)[0]
    return {"prefill_tps": done.prefill_tokens_per_s, "decode_tps": done.decode_tokens_per_s,
            "ttft_s": len(prompt_ids) / done.prefill_tokens_per_s}


def levante_aggregate(llm, prompt_ids: list[int], args: argparse.Namespace) -> float:
    """Output tokens/s of 8 concurrent greedy streams (short prompts, continuous batching)."""
    from levante import SamplingParams

    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompts = [prompt_ids[i * 8:i * 8 + 32] for i in range(8)]
    start = time.perf_counter()
    done = llm.generate(prompts, params)
    return sum(len(d.token_ids) for d in done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quant", default="gguf", help="Levante weights: gguf (kept "
                        "quantized) | none (dequantized to float32)")
    args = parser.parse_args()

    import torch

    from levante import LLM
    from levante.weights.hub import resolve

    torch.set_num_threads(args.threads)
    path = resolve(args.ref)
    llm = LLM(args.ref, max_model_len=2048, quant=args.quant)
    ids = llm.tokenizer.encode(PROMPT_WORDS * 60)[:args.prompt_len]
    print(f"model {path.name}; prompt {len(ids)} tokens; {args.tokens} new tokens; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}", flush=True)
    run_levante(llm, ids[:32], args)  # warm-up
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run_levante(llm, ids, args))
        theirs.extend(run_llama(path, args))
    aggregate = levante_aggregate(llm, ids, args)
    best = {name: {"prefill_tps": max(r["prefill_tps"] for r in rs),
                   "decode_tps": max(r["decode_tps"] for r in rs),
                   "ttft_s": min(r["ttft_s"] for r in rs)}
            for name, rs in (("levante", ours), ("llama.cpp", theirs))}
    lv, lc = best["levante"], best["llama.cpp"]
    print(f"{'engine':<11}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT 500':>10}"
          f"{'8-stream agg':>14}")
    print(f"{'levante':<11}{lv['prefill_tps']:>14.1f}{lv['decode_tps']:>14.1f}"
          f"{lv['ttft_s']:>9.2f}s{aggregate:>14.1f}")
    print(f"{'llama.cpp':<11}{lc['prefill_tps']:>14.1f}{lc['decode_tps']:>14.1f}"
          f"{lc['ttft_s']:>9.2f}s{'(1 stream)':>14}")
    print(f"{'ratio':<11}{lv['prefill_tps'] / lc['prefill_tps']:>13.2f}x"
          f"{lv['decode_tps'] / lc['decode_tps']:>13.2f}x"
          f"{lc['ttft_s'] / lv['ttft_s']:>9.2f}x{aggregate / lc['decode_tps']:>13.2f}x")
    print("(ratios: higher is better for Levante; TTFT ratio = llama.cpp TTFT / Levante TTFT;"
          " aggregate ratio vs llama.cpp's single-stream decode)")


if __name__ == "__main__":
    main()
