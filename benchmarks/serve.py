"""Aggregate throughput and time to first token of `levante serve` at 1/4/8/16 clients.

Usage: .venv/bin/python benchmarks/serve.py [--ref smollm2] [--clients 1,4,8,16]
Starts a server on loopback in a subprocess, then for each concurrency runs that many
streaming clients (each sends `--requests-per-client` requests of `--max-tokens` tokens) and
prints aggregate output tokens/s, TTFT p50/p95 and the throughput ratio to 1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short poem about the sea.",
           "List five uses of a paperclip.", "Describe the water cycle in simple words."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ref: str, port: int, max_num_seqs: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "levante.cli", "serve", ref, "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-model-len", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up")


async def one_client(client: openai.AsyncOpenAI, model: str, index: int, requests: int,
                     max_tokens: int) -> list[tuple[float, int]]:
    results = []
    for r in range(requests):
        start = time.perf_counter()
        ttft, tokens = None, 0
        stream = await client.completions.create(
            model=model, prompt=PROMPTS[(index + r) % len(PROMPTS)], max_tokens=max_tokens,
            temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if ttft is None:
                ttft = time.perf_counter() - start
            tokens += 1 if chunk.choices and chunk.choices[0].text is not None else 0
        results.append((ttft or 0.0, tokens))
    return results


async def run_level(base_url: str, model: str, clients: int, requests: int,
                    max_tokens: int) -> tuple[float, list[float]]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(client, model, i, requests, max_tokens)
                                        for i in range(clients)))
    elapsed = time.perf_counter() - start
    flat = [r for c in per_client for r in c]
    return sum(t for _, t in flat) / elapsed, [f for f, _ in flat]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    port = free_port()
    proc = start(args.ref, port, max(levels))
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        print(f"model {args.ref}; {args.requests_per_client} requests/client x "
              f"{args.max_tokens} tokens; load average {os.getloadavg()[0]:.2f}")
        print(f"{'clients':>8}{'agg tok/s':>12}{'TTFT p50':>10}{'TTFT p95':>10}{'vs 1':>8}")
        base = None
        asyncio.run(run_level(base_url, args.ref, 1, 1, 8))  # warm-up
        for level in levels:
            rate, ttfts = asyncio.run(run_level(base_url, args.ref, level,
                                                args.requests_per_client, args.max_tokens))
            base = base or rate
            q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else [ttfts[0]] * 19
            print(f"{level:>8}{rate:>12.1f}{statistics.median(ttfts):>9.2f}s{q[18]:>9.2f}s"
                  f"{rate / base:>7.2f}x")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
