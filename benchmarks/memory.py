"""What fits: memory and cold start of the plain commands a user types, next to llama.cpp.

Each figure is a fresh process, in interleaved rounds (best of each kept: this machine's
speed drifts 2-4x), on the defaults:
- `levante generate smollm2 --max-tokens 8`: peak RSS (VmHWM of the process) and wall time
  from exec to exit (a cold process: imports, load, tokenizer, prefill, 8 tokens);
- cold time to first token: the same with --max-tokens 1, beside a process that only
  imports PyTorch (the part of a cold start no loader can remove), paired round by round;
- llama.cpp (llama-cpp-python, built once by benchmarks/peers.py) on the same GGUF: load, the
  same prompt, 8 greedy tokens, at the context `levante generate` uses (the model's own:
  8192 for SmolLM2) and at llama-cli's default 4096. llama.cpp allocates and clears its whole
  KV cache at start; Levante reserves its pool without touching it;
- KV growth: one Levante process caching 512, 1024, then 2048 prompt tokens: RSS rises by
  what those tokens' K/V take, not by max_num_seqs x context;
- `levante serve smollm2` idle: RSS once /health answers (issue target: <= 500 MB).

    .venv/bin/python benchmarks/memory.py [--rounds 3] [--model smollm2] [--cold-start-only]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PROMPT_WORDS, llama_python  # benchmarks/ is not a package

ROOT = Path(__file__).resolve().parents[1]
LEVANTE = ROOT / ".venv" / "bin" / "levante"
PROMPT = "The capital of France is"

LLAMA_SCRIPT = r"""
import json, sys, time
start = time.perf_counter()
from llama_cpp import Llama
path, n_ctx, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False)
out = llm(prompt, max_tokens=8, temperature=0.0)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"rss_mib": hwm / 1024, "text": out["choices"][0]["text"]}))
"""

KV_SCRIPT = r"""
import json, sys
from levante import LLM, SamplingParams
def rss():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
llm = LLM(sys.argv[1])
words = sys.stdin.read().split()
ids = llm.bundle.tokenizer.encode(" ".join(words))
rows, before = [], rss()
for n in (512, 1024, 2048):
    llm.generate(ids[:n], SamplingParams(max_tokens=1, temperature=0.0))
    rows.append((n, (rss() - before) / 1024))
config = llm.bundle.model.config
per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * \
    llm.engine.runner.cache.keys[0].element_size()
print(json.dumps({"rows": rows, "kv_mib_per_1k": per_token * 1024 / 2**20,
                  "pool_mib": llm.engine.capacity_tokens * per_token / 2**20}))
"""


def _levante_generate(model: str, max_tokens: int = 8) -> dict[str, float]:
    """Peak RSS (MiB) and wall seconds of one `levante generate` process."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(LEVANTE), "generate", model, "--prompt", PROMPT,
                             "--max-tokens", str(max_tokens), "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"levante generate failed (status {status})")
    text = proc.stdout.read().strip() if proc.stdout else ""
    return {"rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "text": text}


def _import_torch() -> dict[str, float]:
    """Wall seconds of a process that only imports PyTorch: the floor under a cold start.

    It ends as `levante` does (os._exit, no interpreter teardown): a plain `python -c "import
    torch"` also spends ~0.4 s tearing PyTorch's modules down, which would hide that much of
    Levante's own start inside the "floor".
    """
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import os, torch; os._exit(0)"], check=True)
    return {"rss_mib": 0.0, "wall_s": time.perf_counter() - start}


def _cold_start(rounds: int, model: str) -> list[tuple[float, float]]:
    """(levante generate --max-tokens 1, import torch) wall seconds, paired in each round."""
    return [(_levante_generate(model, max_tokens=1)["wall_s"], _import_torch()["wall_s"])
            for _ in range(rounds)]


def _print_cold_start(pairs: list[tuple[float, float]]) -> None:
    first, floor = sorted(p[0] for p in pairs), sorted(p[1] for p in pairs)
    own = sorted(a - b for a, b in pairs)
    mid = len(pairs) // 2
    print(f"\ncold time to first token (levante generate --max-tokens 1, exec to exit), "
          f"{len(pairs)} rounds: best {first[0]:.2f} s, median {first[mid]:.2f} s (target <= 2 s)"
          f"\n  a process that only imports torch: best {floor[0]:.2f} s, median {floor[mid]:.2f} s"
          f"\n  Levante's own part (generate minus torch, same round): best {own[0]:.2f} s, "
          f"median {own[mid]:.2f} s")


def _llama(path: Path, n_ctx: int) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run([str(llama_python()), "-c", LLAMA_SCRIPT, str(path), str(n_ctx),
                          PROMPT], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    result["wall_s"] = time.perf_counter() - start
    return result


def _idle_server_rss(model: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(LEVANTE), "serve", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(3)  # the background warm-up (grammar compiler, tokenizer) settles
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines()
                        if line.startswith("VmRSS:")).split()[1]) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cold-start-only", action="store_true",
                        help="only the cold time to first token, beside the torch import")
    args = parser.parse_args()
    from levante.weights.hub import resolve

    path = resolve(args.model)
    print(f"{args.model}: {path.name}, {path.stat().st_size / 2**20:.0f} MiB; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    if args.cold_start_only:
        _print_cold_start(_cold_start(args.rounds, args.model))
        return
    runs: dict[str, list[dict[str, float]]] = {"levante": [], "llama 8192": [], "llama 4096": []}
    cold: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        cold += _cold_start(1, args.model)
        runs["levante"].append(_levante_generate(args.model))
        runs["llama 8192"].append(_llama(path, 8192))
        runs["llama 4096"].append(_llama(path, 4096))
    best = {k: {"rss_mib": min(r["rss_mib"] for r in v), "wall_s": min(r["wall_s"] for r in v)}
            for k, v in runs.items()}
    lv = best["levante"]
    print(f"\n{'process (cold, 8 new tokens)':<34}{'peak RSS MiB':>13}{'wall s':>8}")
    for name, label in (("levante", "levante generate (context 8192)"),
                        ("llama 8192", "llama.cpp, n_ctx 8192"),
                        ("llama 4096", "llama.cpp, n_ctx 4096")):
        b = best[name]
        ratio = "" if name == "levante" else (f"   Levante/this: RSS {lv['rss_mib'] / b['rss_mib']:.2f}x,"
                                             f" wall {lv['wall_s'] / b['wall_s']:.2f}x")
        print(f"{label:<34}{b['rss_mib']:>13.0f}{b['wall_s']:>8.2f}{ratio}")
    print(f"levante said: {runs['levante'][0]['text']!r}")
    _print_cold_start(cold)

    kv = subprocess.run([sys.executable, "-c", KV_SCRIPT, args.model], input=PROMPT_WORDS * 200,
                        capture_output=True, text=True, check=True)
    growth = json.loads(kv.stdout)
    print(f"\nKV growth (one process; the pool holds {growth['pool_mib']:.0f} MiB if full, "
          f"{growth['kv_mib_per_1k']:.1f} MiB per 1K tokens):")
    for n, mib in growth["rows"]:
        print(f"  {n:>5} prompt tokens cached: RSS +{mib:.1f} MiB")
    print(f"\nlevante serve {args.model}, idle after start: {_idle_server_rss(args.model):.0f} "
          f"MiB RSS (target <= 500)")


if __name__ == "__main__":
    main()
