"""One process vs 2 replicas through Ray Serve vs 2 behind the built-in front: tokens/s, TTFT,
and the latency each front adds to a request.

Usage: .venv/bin/python benchmarks/ray_replicas.py [--ref smollm2] [--clients 1,8,32]
           [--max-tokens 32] [--setups one,ray,front]
On a lent GPU (TP=1 vs replicas sharing one GPU, 1-64 clients):
       .venv/bin/python benchmarks/ray_replicas.py --ref mistral-small --device cuda \\
           --clients 1,8,16,32,64 --max-tokens 128 --ray-gpus 0.5 --kv-cache-memory 20GB

Starts every setup's `levante serve` on loopback in subprocesses (one process: `levante serve`;
ray: `--ray --replicas 2`, a local Ray cluster; front: `--replicas 2`), all up at once so
each client level runs on each setup back to back (this machine's speed drifts: ratios are
taken within a level). Each client streams `--requests-per-client` completions of
`--max-tokens` tokens. Then the added latency: p50 of `GET /v1/models` (answered by an engine
replica's app, no model work) through each front minus the same on the one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import PROMPTS, free_port

SETUPS = {"one": [], "ray": ["--ray", "--replicas", "2"], "front": ["--replicas", "2"]}


def start(setup: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """`levante serve` for `setup` in its own process group (Ray's processes join it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "levante.cli", "serve", args.ref, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "1024",
           "--device", args.device, "--no-web", *SETUPS[setup]]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", args.kv_cache_memory]
    if setup == "ray":
        cmd += ["--ray-cpus", str(args.ray_cpus)]
        cmd += ["--ray-gpus", str(args.ray_gpus)] if args.ray_gpus is not None else []
    log = open(Path(args.log_dir) / f"{setup}.log", "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], url: str, setup: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{setup} exited with {proc.returncode} (see its log)")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{setup} did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the group (as Ctrl-C would), then SIGKILL what is left after 60 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def one_client(client: httpx.AsyncClient, model: str, index: int, requests: int,
                     max_tokens: int) -> list[tuple[float, int]]:
    results = []
    for r in range(requests):
        body = {"model": model, "prompt": PROMPTS[(index + r) % len(PROMPTS)] + f" ({index})",
                "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "ignore_eos": True}
        start, ttft, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"text"' in line:
                    ttft = ttft or time.perf_counter() - start
                    tokens += 1
        results.append((ttft or 0.0, tokens))
    return results


async def run_level(url: str, model: str, clients: int, requests: int,
                    max_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, TTFT p50 in s) of `clients` concurrent streaming clients."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(client, model, i, requests, max_tokens)
                                            for i in range(clients)))
        elapsed = time.perf_counter() - start
    flat = [r for c in per_client for r in c]
    return sum(t for _, t in flat) / elapsed, statistics.median(f for f, _ in flat)


def latency_p50(url: str, num_requests: int) -> float:
    """p50 seconds of GET /v1/models, one at a time on one connection."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/v1/models")
        times = []
        for _ in range(num_requests):
            start = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--setups", default="one,ray,front")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache-memory", default=None, help="per engine, e.g. 20GB")
    parser.add_argument("--ray-cpus", type=float, default=0.5)
    parser.add_argument("--ray-gpus", type=float, default=None)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args()
    setups = args.setups.split(",")
    levels = [int(c) for c in args.clients.split(",")]
    servers = {setup: start(setup, args) for setup in setups}
    try:
        for setup, (proc, url) in servers.items():
            wait_ready(proc, url, setup)
            asyncio.run(run_level(url, args.ref, 2, 1, 4))  # warm-up
        print(f"model {args.ref} on {args.device}; {os.cpu_count()} cores; "
              f"{args.requests_per_client} requests/client x {args.max_tokens} tokens; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'clients':>8}{'setup':>7}{'agg tok/s':>11}{'TTFT p50':>10}{'vs one':>8}")
        for level in levels:
            rates = {}
            for setup, (_, url) in servers.items():
                rate, ttft = asyncio.run(run_level(url, args.ref, level,
                                                   args.requests_per_client, args.max_tokens))
                rates[setup] = rate
                ratio = f"{rate / rates['one']:.2f}x" if "one" in rates else "-"
                print(f"{level:>8}{setup:>7}{rate:>11.1f}{ttft:>9.3f}s{ratio:>8}")
        p50 = {setup: latency_p50(url, args.latency_requests)
               for setup, (_, url) in servers.items()}
        for setup in setups:
            added = f"; added {(p50[setup] - p50['one']) * 1e3:+.2f} ms" \
                if "one" in p50 and setup != "one" else ""
            print(f"GET /v1/models p50 {setup}: {p50[setup] * 1e3:.2f} ms{added}")
    finally:
        for proc, _ in servers.values():
            stop(proc)


if __name__ == "__main__":
    main()
