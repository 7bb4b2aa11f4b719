"""Does the HTTP front wait on the engine? /health and rejections while streams decode.

Usage: .venv/bin/python benchmarks/front.py [--ref smollm2] [--streams 16] [--seconds 20]
Starts `levante serve` on loopback in a subprocess, keeps `--streams` streaming completions
decoding, and meanwhile (1) polls /health every 20 ms and (2) posts 1 MB prompts back to back
(more tokens than any context: each must be refused with a 400). Prints the latency of
/health (p50/p99/max), the time to the first byte of each refusal (p50/p99/max), and the
streams' aggregate tokens/s. The issue's targets: both p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import free_port, start

PROMPT = "Explain how a bicycle stays upright, in detail."


async def stream_forever(client: httpx.AsyncClient, model: str, stop: asyncio.Event,
                         counts: list[int]) -> None:
    while not stop.is_set():
        body = {"model": model, "prompt": PROMPT, "max_tokens": 256, "stream": True,
                "ignore_eos": True, "temperature": 0.0}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    counts[0] += 1
                if stop.is_set():
                    break


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event,
                      latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        response = await client.get("/health")
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
        await asyncio.sleep(0.02)


async def post_huge(client: httpx.AsyncClient, model: str, stop: asyncio.Event,
                    latencies: list[float]) -> None:
    body = {"model": model, "prompt": "lorem ipsum dolor " * (2**20 // 18), "max_tokens": 8}
    while not stop.is_set():
        start = time.perf_counter()
        async with client.stream("POST", "/v1/completions", json=body) as response:
            await response.aread()
            latencies.append(time.perf_counter() - start)
        assert response.status_code == 400, response.status_code


def summary(name: str, values: list[float]) -> str:
    q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
    return (f"{name:<22}{len(values):>6}{statistics.median(values) * 1e3:>10.1f}"
            f"{q[98] * 1e3:>10.1f}{max(values) * 1e3:>10.1f}")


async def run(base_url: str, model: str, streams: int, seconds: float) -> None:
    stop = asyncio.Event()
    counts = [0]
    health: list[float] = []
    refused: list[float] = []
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        tasks = [asyncio.create_task(stream_forever(client, model, stop, counts))
                 for _ in range(streams)]
        await asyncio.sleep(3)  # the streams are decoding
        counts[0] = 0
        start = time.perf_counter()
        probes = [asyncio.create_task(poll_health(client, stop, health)),
                  asyncio.create_task(post_huge(client, model, stop, refused))]
        await asyncio.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - start
        await asyncio.gather(*probes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"{'':<22}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(summary("/health", health))
    print(summary("1 MB prompt refused", refused))
    print(f"{streams} streams: {counts[0] / elapsed:.1f} tokens/s aggregate while probed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    port = free_port()
    proc = start(args.ref, port, args.streams)
    try:
        print(f"model {args.ref}; load average {os.getloadavg()[0]:.2f}")
        asyncio.run(run(f"http://127.0.0.1:{port}", args.ref, args.streams, args.seconds))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
