"""One process vs 2 replicas through Ray Serve vs 2 behind the built-in front: tokens/s, TTFT,
and the latency each front adds to a request.

Usage: .venv/bin/python benchmarks/ray_replicas.py [--ref smollm2] [--clients 1,8,32]
           [--max-tokens 32] [--setups one,ray,rayproxy,front]
On a lent GPU (TP=1 vs replicas sharing one GPU, 1-64 clients):
       .venv/bin/python benchmarks/ray_replicas.py --ref mistral-small --device cuda \\
           --clients 1,8,16,32,64 --max-tokens 128 --ray-gpus 0.5 --kv-cache-memory 20GB

Starts every setup's `levante serve` on loopback in subprocesses (one process: `levante serve`;
ray: `--ray --replicas 2`, a local Ray cluster, HTTP served by the `levante serve` process;
rayproxy: the same through Ray Serve's proxy and ingress deployment, `--ray-proxy`; front:
`--replicas 2`), all up at once so each client level runs on each setup back to back (this
machine's speed drifts: ratios are taken within a level). Each client streams
`--requests-per-client` completions of `--max-tokens` tokens. Then the added latency, one
request at a time, the setups interleaved (in shuffled order each round) so drift hits them
alike: `GET /v1/models` (answered by an engine replica's app, no model work) and a 1-token
`POST /v1/completions`; per setup the p50 of each round's difference to the one process, with
the number of rounds, and the range of that p50 over the run's quarters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import PROMPTS, free_port

SETUPS = {"one": [], "ray": ["--ray", "--replicas", "2"],
          "rayproxy": ["--ray", "--replicas", "2", "--ray-proxy"], "front": ["--replicas", "2"]}
PROBES = {"GET /v1/models": ("GET", "/v1/models", None),
          "POST 1 token": ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1,
                                                       "temperature": 0.0})}


def start(setup: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """`levante serve` for `setup` in its own process group (Ray's processes join it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "levante.cli", "serve", args.ref, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "1024",
           "--device", args.device, "--no-web", *SETUPS[setup]]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", args.kv_cache_memory]
    if setup.startswith("ray"):
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


def added_latency(urls: dict[str, str], model: str, num_rounds: int
                  ) -> dict[str, dict[str, list[float]]]:
    """Seconds per request of each probe on each setup: `num_rounds` rounds, each sending
    every probe once to every setup (one at a time, setups in shuffled order, one kept-alive
    connection per setup)."""
    clients = {setup: httpx.Client(base_url=url, timeout=30) for setup, url in urls.items()}
    times: dict[str, dict[str, list[float]]] = {p: {s: [] for s in urls} for p in PROBES}
    order = list(urls)
    try:
        for round_ in range(num_rounds + 5):  # the first 5: warm-up
            random.shuffle(order)
            for probe, (method, path, body) in PROBES.items():
                for setup in order:
                    start = time.perf_counter()
                    response = clients[setup].request(
                        method, path, json=body and {**body, "model": model})
                    elapsed = time.perf_counter() - start
                    assert response.status_code == 200, (setup, response.text)
                    if round_ >= 5:
                        times[probe][setup].append(elapsed)
    finally:
        for client in clients.values():
            client.close()
    return times


def print_added(times: dict[str, dict[str, list[float]]]) -> None:
    """Per probe and setup: p50 (p10-p90) ms; vs one process, the p50 of the per-round
    differences and its range over the run's quarters."""
    for probe, per_setup in times.items():
        for setup, samples in per_setup.items():
            deciles = statistics.quantiles(samples, n=10)
            line = (f"{probe:<16}{setup:>9}: p50 {statistics.median(samples) * 1e3:6.2f} ms "
                    f"(p10 {deciles[0] * 1e3:.2f}, p90 {deciles[-1] * 1e3:.2f})")
            if setup != "one" and "one" in per_setup:
                diffs = [a - b for a, b in zip(samples, per_setup["one"], strict=True)]
                quarter = max(1, len(diffs) // 4)
                parts = [statistics.median(diffs[i:i + quarter])
                         for i in range(0, len(diffs) - quarter + 1, quarter)]
                line += (f"; added p50 {statistics.median(diffs) * 1e3:+.2f} ms over "
                         f"{len(diffs)} rounds (quarters {min(parts) * 1e3:+.2f} to "
                         f"{max(parts) * 1e3:+.2f})")
            print(line)


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
    parser.add_argument("--latency-rounds", type=int, default=200)
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args()
    setups = args.setups.split(",")
    levels = [int(c) for c in args.clients.split(",") if c]  # none: latency only
    servers = {setup: start(setup, args) for setup in setups}
    try:
        for setup, (proc, url) in servers.items():
            wait_ready(proc, url, setup)
            asyncio.run(run_level(url, args.ref, 2, 1, 4))  # warm-up
        print(f"model {args.ref} on {args.device}; {os.cpu_count()} cores; "
              f"{args.requests_per_client} requests/client x {args.max_tokens} tokens; "
              f"load average {os.getloadavg()[0]:.2f}")
        if levels:
            print(f"{'clients':>8}{'setup':>9}{'agg tok/s':>11}{'TTFT p50':>10}{'vs one':>8}")
        for level in levels:
            rates = {}
            for setup, (_, url) in servers.items():
                rate, ttft = asyncio.run(run_level(url, args.ref, level,
                                                   args.requests_per_client, args.max_tokens))
                rates[setup] = rate
                ratio = f"{rate / rates['one']:.2f}x" if "one" in rates else "-"
                print(f"{level:>8}{setup:>9}{rate:>11.1f}{ttft:>9.3f}s{ratio:>8}")
        print(f"added latency, load average {os.getloadavg()[0]:.2f}:")
        print_added(added_latency({setup: url for setup, (_, url) in servers.items()},
                                  args.ref, args.latency_rounds))
    finally:
        for proc, _ in servers.values():
            stop(proc)


if __name__ == "__main__":
    main()
