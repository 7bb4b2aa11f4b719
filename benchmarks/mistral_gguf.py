"""Mistral Small 3's GGUF files as users download them: Levante next to llama.cpp, one run.

Builds the Mistral-shaped proxy the way such files are made (Mistral Small 3's exact layout at
width / 4 and 8 layers: head_dim 128, 4:1 GQA, 131072-token Tekken vocab, untied output; random
weights from transformers -> bf16 safetensors -> `levante quantize --to f16` -> llama.cpp's own
quantizer for Q4_K_M, Q3_K_M and Q8_0), then, per file, interleaved rounds of a fresh Levante
process and a fresh llama.cpp process (llama-cpp-python, built once by benchmarks/peers.py) on
the same 256 prompt token ids, 64 new greedy tokens, the same thread count and context (2048):
prefill and decode tokens/s, peak RSS, and the GB/s the decode reads against the machine's
measured memory bandwidth. Best round of each is kept; ratios are Levante / llama.cpp.

`--perplexity` adds fidelity on real text: SmolLM2 made into Q4_K_M and Q3_K_M by llama.cpp's
quantizer (from `levante quantize --to f16`), perplexity over the shipped corpus with the same
token ids and windows in both engines.

    .venv/bin/python benchmarks/mistral_gguf.py [--threads 2] [--rounds 3] [--perplexity]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PROMPT_WORDS, llama_python  # benchmarks/ is not a package

FILES = {"Q4_K_M": 15, "Q3_K_M": 12, "Q8_0": 7}  # llama.cpp's llama_ftype numbers
CONTEXT = 2048

PROXY_SCRIPT = r"""
import json, sys, importlib.resources as ir
import torch
from transformers import MistralConfig, MistralForCausalLM
out = sys.argv[1]
torch.manual_seed(11)
cfg = MistralConfig(vocab_size=131072, hidden_size=1280, intermediate_size=8192,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=128, rope_theta=1e8, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, sliding_window=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
model = MistralForCausalLM(cfg).eval()
with torch.no_grad():  # a spread that keeps logits informative, not uniform
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.normal_(0, 0.06 if "embed" in name or "lm_head" in name else 0.03)
model.to(torch.bfloat16).save_pretrained(out)
tekken = json.loads((ir.files("mistral_common") / "data" / "tekken_240911.json").read_text())
tekken["config"]["version"] = "v7"  # Mistral Small 3's instruct version
with open(f"{out}/tekken.json", "w") as f:
    json.dump(tekken, f)
"""

QUANTIZE_SCRIPT = r"""
import sys, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = ftype, 2
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))
"""

# VmHWM of this process image (ru_maxrss would count the parent's memory at fork time).
PEAK_RSS = r"""
def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

LEVANTE_SCRIPT = PEAK_RSS + r"""
import json, sys, time
import torch
from levante import LLM, SamplingParams
from levante.quant.gguf_linear import kernel_summary
path, threads, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
torch.set_num_threads(threads)
llm = LLM(path, max_model_len=CONTEXT)
params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
llm.generate(ids[:16], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
done = llm.generate(ids, params)[0]
print(json.dumps({"prefill_tps": done.prefill_tokens_per_s,
                  "decode_tps": done.decode_tokens_per_s,
                  "rss_mib": peak_rss_mib(), "kernels": kernel_summary(llm.bundle.model)}))
""".replace("CONTEXT", str(CONTEXT))

LLAMA_SCRIPT = PEAK_RSS + r"""
import json, sys, time
from llama_cpp import Llama
path, threads, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=CONTEXT,
            n_batch=512, verbose=False)
llm.eval(ids[:16]); llm.reset()  # warm-up, as Levante gets
start = time.perf_counter()
llm.eval(ids)
prefill = time.perf_counter() - start
token = llm.sample(temp=0.0)
start = time.perf_counter()
for _ in range(new_tokens - 1):
    llm.eval([token])
    token = llm.sample(temp=0.0)
decode = time.perf_counter() - start
print(json.dumps({"prefill_tps": len(ids) / prefill, "decode_tps": (new_tokens - 1) / decode,
                  "rss_mib": peak_rss_mib()}))
""".replace("CONTEXT", str(CONTEXT))

LEVANTE_NLL_SCRIPT = r"""
import json, sys
import torch
from levante.bundle import load
from levante.eval.perplexity import negative_log_likelihood
path, threads, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
torch.set_num_threads(threads)
model = load(path).model
total, count = negative_log_likelihood(model, ids, window=window, stride=window)
print(json.dumps({"nll": total, "count": count}))
"""

LLAMA_NLL_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, threads, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=window,
            n_batch=window, logits_all=True, verbose=False)
total, count = 0.0, 0
for begin in range(0, len(ids), window):  # independent windows, scoring tokens 1.. of each
    chunk = ids[begin:begin + window]
    if len(chunk) < 2:
        break
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    total -= float(log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum())
    count += len(chunk) - 1
print(json.dumps({"nll": total, "count": count}))
"""


def levante_bin() -> str:
    return str(Path(sys.executable).with_name("levante"))


def build_proxy(folder: Path, peer: Path) -> dict[str, Path]:
    """The proxy's GGUF files (built once, then found in `folder`)."""
    hf = folder / "hf"
    if not (hf / "config.json").exists():
        print(f"building the Mistral-shaped proxy in {hf} ...", flush=True)
        hf.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", PROXY_SCRIPT, str(hf)], check=True)
    f16 = folder / "proxy-f16.gguf"
    if not f16.exists():
        subprocess.run([levante_bin(), "quantize", str(hf), "--to", "f16", "--out", str(f16)],
                       check=True, capture_output=True)
    return {name: llama_quantize(peer, f16, folder / f"proxy-{name.lower()}.gguf", ftype)
            for name, ftype in FILES.items()}


def llama_quantize(peer: Path, src: Path, dst: Path, ftype: int) -> Path:
    """`dst`, made from `src` by llama.cpp's own quantizer (no importance matrix)."""
    if not dst.exists():
        partial = dst.with_suffix(".partial")
        subprocess.run([str(peer), "-c", QUANTIZE_SCRIPT, str(src), str(partial), str(ftype)],
                       check=True, capture_output=True)
        partial.rename(dst)
    return dst


def run_child(python: str, script: str, path: Path, args: argparse.Namespace,
              ids: list[int], *extra: str) -> dict:
    result = subprocess.run([python, "-c", script, str(path), str(args.threads), *extra],
                            input=json.dumps(ids), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{python} on {path.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of 5 sums over 1 GiB of float32 (torch, `threads` threads)."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every tensor but the embedding table (one row)."""
    from levante.weights.gguf import GGUFFile

    gguf_file = GGUFFile(path)
    return sum(gguf_file.nbytes(name) for name in gguf_file.tensor_names
               if name != "token_embd.weight")


def prompt_ids(hf: Path, count: int) -> list[int]:
    """`count` token ids of plain English text from the proxy's Tekken tokenizer."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tekken = Tekkenizer.from_file(hf / "tekken.json")
    return tekken.encode(PROMPT_WORDS * 60, bos=True, eos=False)[:count]


def speed_table(files: dict[str, Path], ids: list[int], args: argparse.Namespace) -> None:
    peer = str(llama_python())
    bandwidth = memory_bandwidth_gbs(args.threads)
    print(f"memory read bandwidth (torch sum over 1 GiB, {args.threads} threads): "
          f"{bandwidth:.1f} GB/s", flush=True)
    header = (f"{'file':<8}{'MB':>6}  {'engine':<10}{'prefill':>9}{'decode':>8}{'GB/s':>6}"
              f"{'% bw':>6}{'RSS MiB':>9}")
    rows = []
    for name, path in files.items():
        ours, theirs = [], []
        for _ in range(args.rounds):  # interleaved: this machine's speed drifts
            ours.append(run_child(sys.executable, LEVANTE_SCRIPT, path, args, ids,
                                  str(args.tokens)))
            theirs.append(run_child(peer, LLAMA_SCRIPT, path, args, ids, str(args.tokens)))
        per_token = bytes_per_token(path)
        best = {}
        for engine, runs in (("levante", ours), ("llama.cpp", theirs)):
            best[engine] = {"prefill_tps": max(r["prefill_tps"] for r in runs),
                            "decode_tps": max(r["decode_tps"] for r in runs),
                            "rss_mib": min(r["rss_mib"] for r in runs)}
        print(f"{name}: Levante kernels {ours[0]['kernels']}", flush=True)
        size = path.stat().st_size / 1e6
        for engine, b in best.items():
            gbs = b["decode_tps"] * per_token / 1e9
            rows.append(f"{name:<8}{size:>6.0f}  {engine:<10}{b['prefill_tps']:>9.1f}"
                        f"{b['decode_tps']:>8.1f}{gbs:>6.1f}{100 * gbs / bandwidth:>5.0f}%"
                        f"{b['rss_mib']:>9.0f}")
        lv, lc = best["levante"], best["llama.cpp"]
        rows.append(f"{name:<8}{'':>6}  {'ratio':<10}{lv['prefill_tps'] / lc['prefill_tps']:>8.2f}x"
                    f"{lv['decode_tps'] / lc['decode_tps']:>7.2f}x{'':>12}"
                    f"{lv['rss_mib'] / lc['rss_mib']:>8.2f}x")
    print(header)
    print("\n".join(rows))
    print(f"({len(ids)}-token prompt, {args.tokens} new tokens, context {CONTEXT}, "
          f"{args.threads} threads, best of {args.rounds} interleaved rounds; prefill/decode in "
          f"tokens/s; ratios Levante / llama.cpp, RSS ratio lower is better)")


def perplexity_table(folder: Path, args: argparse.Namespace) -> None:
    """SmolLM2 as Q4_K_M and Q3_K_M by llama.cpp's quantizer: perplexity in both engines."""
    from levante.bundle import load
    from levante.weights.hub import resolve

    peer = llama_python()
    f16 = folder / "smollm2-f16.gguf"
    if not f16.exists():
        subprocess.run([levante_bin(), "quantize", str(resolve("smollm2")), "--to", "f16",
                        "--out", str(f16)], check=True, capture_output=True)
    corpus = Path(__file__).resolve().parent.parent / "src" / "levante" / "data" / "corpus.txt"
    tokenizer = load(str(f16), quant="none").tokenizer
    ids = tokenizer.encode(corpus.read_text(encoding="utf-8"))[:args.ppl_tokens]
    print(f"perplexity: SmolLM2, {len(ids)} tokens of src/levante/data/corpus.txt, "
          f"windows of {args.window}")
    print(f"{'file':<8}{'levante':>10}{'llama.cpp':>11}{'diff':>8}")
    for name in ("Q4_K_M", "Q3_K_M"):
        path = llama_quantize(peer, f16, folder / f"smollm2-{name.lower()}.gguf", FILES[name])
        ours = run_child(sys.executable, LEVANTE_NLL_SCRIPT, path, args, ids, str(args.window))
        theirs = run_child(str(peer), LLAMA_NLL_SCRIPT, path, args, ids, str(args.window))
        ppl_ours = pow(2.718281828459045, ours["nll"] / ours["count"])
        ppl_theirs = pow(2.718281828459045, theirs["nll"] / theirs["count"])
        print(f"{name:<8}{ppl_ours:>10.3f}{ppl_theirs:>11.3f}"
              f"{100 * (ppl_ours / ppl_theirs - 1):>+7.2f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--files", default=",".join(FILES), help="which of " + ", ".join(FILES))
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the proxy lives (default $LEVANTE_HOME/proxy)")
    args = parser.parse_args()

    from levante.weights.store import levante_home

    folder = args.folder or levante_home() / "proxy"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    files = build_proxy(folder, llama_python())
    wanted = {name: files[name] for name in args.files.split(",")}
    speed_table(wanted, prompt_ids(folder / "hf", args.prompt_len), args)
    if args.perplexity:
        perplexity_table(folder, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
