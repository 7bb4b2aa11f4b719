"""Levante's GGUF K-quant writer next to llama.cpp's quantizer: same F16 GGUF in, one run.

Makes an F16 GGUF of --ref (`levante quantize --to f16`), then each --formats file twice: by
`levante quantize` and by llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`, no
importance matrix, in the peer venv benchmarks/peers.py builds). Per format it prints the
seconds and MB each took, how many tensors have llama.cpp's type and byte-identical data, and
the perplexity of both files over src/levante/data/corpus.txt in Levante and in llama.cpp
(same token ids, independent windows of --window tokens), with ours / llama.cpp. Loading our
file in llama.cpp is part of that. Then quantizer speed: MB/s of float32 input through
`levante.quant.k_quantize` and llama.cpp's C reference (`quantize_row_*_K_ref`, one thread,
through ctypes) on an 8192 x 1280 tensor, interleaved rounds, best kept.

Where a row is not whole 256-value super-blocks (SmolLM2's width is 576) both fall back to
Q5_0 / Q5_1 for Q4_K / Q5_K tensors, as llama.cpp does.

    .venv/bin/python benchmarks/quantize.py [--ref smollm2] [--formats q4_k_m,q3_k_m]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import llama_python  # benchmarks/ is not a package

CORPUS = Path(__file__).resolve().parent.parent / "src" / "levante" / "data" / "corpus.txt"

LLAMA_QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""

LLAMA_NLL = r"""
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


def llama_quantize(peer: Path, src: Path, dst: Path, ftype: int, threads: int) -> float:
    """llama.cpp's quantizer, src -> dst; seconds it took."""
    start = time.perf_counter()
    done = subprocess.run([str(peer), "-c", LLAMA_QUANTIZE, str(src), str(dst), str(ftype),
                           str(threads)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp's quantizer failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare_tensors(ours: Path, theirs: Path) -> tuple[int, int, int, dict[str, int]]:
    """(tensors, same type, identical bytes, {"ours->theirs": count} where types differ)."""
    from gguf import GGUFReader

    ours_tensors = {t.name: t for t in GGUFReader(ours).tensors}
    theirs_tensors = {t.name: t for t in GGUFReader(theirs).tensors}
    same_type = identical = 0
    differ: dict[str, int] = {}
    for name, theirs_tensor in theirs_tensors.items():
        mine = ours_tensors[name]
        if mine.tensor_type != theirs_tensor.tensor_type:
            key = f"{mine.tensor_type.name}<-{theirs_tensor.tensor_type.name}"
            differ[key] = differ.get(key, 0) + 1
            continue
        same_type += 1
        identical += bool(np.array_equal(mine.data, theirs_tensor.data))
    return len(theirs_tensors), same_type, identical, differ


def levante_perplexity(path: Path, ids: list[int], window: int) -> float:
    from levante.bundle import load
    from levante.eval.perplexity import negative_log_likelihood

    model = load(str(path), quant="none").model
    total, count = negative_log_likelihood(model, ids, window=window, stride=window)
    return math.exp(total / count)


def llama_perplexity(peer: Path, path: Path, ids: list[int], window: int, threads: int) -> float:
    done = subprocess.run([str(peer), "-c", LLAMA_NLL, str(path), str(threads), str(window)],
                          input=json.dumps(ids), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp could not score {path.name}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return math.exp(result["nll"] / result["count"])


def format_table(args: argparse.Namespace, peer: Path, folder: Path) -> None:
    from levante.bundle import load
    from levante.quant.export import quantize_checkpoint
    from levante.quant.gguf_quantize import GGUF_FORMATS

    f16 = folder / f"{args.ref}-f16.gguf"
    if not f16.exists():
        quantize_checkpoint(args.ref, to="f16", out=f16, progress=False)
    tokenizer = load(str(f16), quant="none").tokenizer
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8"),
                           add_bos=tokenizer.should_add_bos)[:args.ppl_tokens]
    reference = levante_perplexity(f16, ids, args.window)
    print(f"{args.ref}: F16 {f16.stat().st_size / 1e6:.0f} MB, perplexity {reference:.3f} over "
          f"{len(ids)} corpus tokens (windows of {args.window})", flush=True)
    print(f"{'format':<8}{'by':<11}{'s':>6}{'MB':>7}{'same type':>11}{'same bytes':>12}"
          f"{'ppl Levante':>13}{'ppl llama.cpp':>15}")
    for fmt in filter(None, args.formats.split(",")):
        paths = {engine: folder / f"{args.ref}-{fmt}-{engine}.gguf"
                 for engine in ("levante", "llama.cpp")}
        seconds = {}
        start = time.perf_counter()
        quantize_checkpoint(f16, to=fmt, out=paths["levante"], progress=False)
        seconds["levante"] = time.perf_counter() - start
        seconds["llama.cpp"] = llama_quantize(peer, f16, paths["llama.cpp"],
                                              GGUF_FORMATS[fmt][1], args.threads)
        ppl = {}
        for engine, path in paths.items():
            num_tensors, same_type, identical, differ = compare_tensors(path, paths["llama.cpp"])
            ppl[engine] = (levante_perplexity(path, ids, args.window),
                           llama_perplexity(peer, path, ids, args.window, args.threads))
            print(f"{fmt:<8}{engine:<11}{seconds[engine]:>6.1f}{path.stat().st_size / 1e6:>7.1f}"
                  f"{f'{same_type}/{num_tensors}':>11}{f'{identical}/{num_tensors}':>12}"
                  f"{ppl[engine][0]:>13.3f}{ppl[engine][1]:>15.3f}"
                  + (f"   types ours<-llama.cpp: {differ}" if differ else ""), flush=True)
        ratio = [ppl["levante"][i] / ppl["llama.cpp"][i] for i in (0, 1)]
        print(f"{fmt:<8}{'ratio':<11}{'levante / llama.cpp perplexity':>42}{ratio[0]:>9.4f}"
              f"{ratio[1]:>15.4f}")


def ggml_reference(peer: Path) -> ctypes.CDLL:
    lib = sorted((peer.parent.parent / "lib").glob(
        "python3*/site-packages/llama_cpp/lib/libggml-base.so"))
    if not lib:
        raise SystemExit(f"no libggml-base.so under {peer.parent.parent}")
    return ctypes.CDLL(str(lib[0]))


def speed_table(args: argparse.Namespace, peer: Path) -> None:
    """MB/s of float32 input, ours (numpy, --threads) vs llama.cpp's C reference (1 thread)."""
    from gguf import GGML_QUANT_SIZES

    from levante.quant.k_quantize import K_QUANTIZERS, quantize

    library = ggml_reference(peer)
    values = (np.random.default_rng(0).standard_normal((8192, 1280)) * 0.02).astype(np.float32)
    print(f"quantizer speed on 8192 x 1280 float32 ({values.nbytes / 1e6:.0f} MB), best of "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}")
    print(f"{'type':<6}{'levante 1 thr':>15}{f'levante {args.threads} thr':>15}"
          f"{'llama.cpp C':>13}{'ratio 1 thr':>13}")
    for qtype in K_QUANTIZERS:
        function = getattr(library, f"quantize_row_{qtype.name[:2].lower()}_K_ref")
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        out = np.empty(values.size // 256 * GGML_QUANT_SIZES[qtype][1], np.uint8)
        runs = {"one": partial(quantize, values, qtype),
                "many": partial(quantize, values, qtype, num_threads=args.threads),
                "c": partial(function, values.ctypes.data, out.ctypes.data, values.size)}
        best = dict.fromkeys(runs, math.inf)
        for _ in range(args.rounds):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - start)
        rate = {key: values.nbytes / seconds / 1e6 for key, seconds in best.items()}
        print(f"{qtype.name:<6}{rate['one']:>12.1f} MB/s{rate['many']:>10.1f} MB/s"
              f"{rate['c']:>8.1f} MB/s{rate['one'] / rate['c']:>12.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--formats", default="q4_k_m,q3_k_m", help="'' for the speed table only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/levante-quantize-bench"))
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    args.folder.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    peer = llama_python()
    if args.formats:
        format_table(args, peer, args.folder)
    if not args.skip_speed:
        speed_table(args, peer)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
