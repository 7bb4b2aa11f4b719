"""Soak test: mixed traffic against a live `levante serve` for a set time, then its invariants.

Usage: .venv/bin/python benchmarks/soak.py --duration 600 --clients 8 [--base-url URL]
Without --base-url it starts `python -m levante.cli serve smollm2 --port P` itself. Each client
loops over a weighted mix: chat and completions, streaming or not, n>1, seeds, stop strings,
Ollama /api/chat, hang-ups mid-stream, tool and response_format requests (200, or 400 while
structured output is not in the engine), and many kinds of bad request (each must get its 4xx
in the right error shape). Prints requests sent, succeeded, rejected as expected, failed
unexpectedly (must be 0), latency p50/p95, server RSS at start and end, and KV blocks in use
once idle (must be 0). Exits 1 if an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

PROMPTS = ["Explain how a bicycle stays upright.", "Write a haiku about rain.",
           "List three uses of a paperclip.", "What is 17 times 3?", "Say hello in French."]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                                  "age": {"type": "integer"}},
                 "required": ["name", "age"]}


@dataclass
class Tally:
    """What happened, by outcome and by kind of request."""

    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def record(self, kind: str, outcome: str, seconds: float | None = None,
               detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.kinds[(kind, outcome)] += 1
        if seconds is not None and outcome == "succeeded":
            self.latencies.append(seconds)
        if outcome == "failed unexpectedly" and len(self.failures) < 20:
            self.failures.append(f"{kind}: {detail[:300]}")


class Unexpected(Exception):
    """A response that breaks the contract (wrong status, shape, or a broken stream)."""


def check_error(response: httpx.Response, statuses: tuple[int, ...], *, ollama: bool) -> None:
    if response.status_code not in statuses:
        raise Unexpected(f"status {response.status_code} (expected {statuses}): "
                         f"{response.text[:200]}")
    error = response.json().get("error")
    if ollama:
        if not (isinstance(error, str) and error):
            raise Unexpected(f"not an Ollama error: {response.text[:200]}")
    elif not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}):
        raise Unexpected(f"not an OpenAI error: {response.text[:200]}")
    if response.status_code in (429, 503) and "retry-after" not in response.headers:
        raise Unexpected(f"{response.status_code} without Retry-After")


def check_structured(choice: dict[str, object], extra: dict[str, object]) -> None:
    """A finished constrained answer parses: JSON (with the schema's keys) or tool calls."""
    message, reason = choice["message"], choice["finish_reason"]
    assert isinstance(message, dict)
    if reason not in ("stop", "length", "tool_calls"):
        raise Unexpected(f"finish_reason {reason}")
    if reason == "tool_calls":
        for call in message.get("tool_calls") or [None]:
            if not (isinstance(call, dict) and call["function"]["name"] == "get_weather"):
                raise Unexpected(f"bad tool call {call}")
            json.loads(call["function"]["arguments"])
    elif reason == "stop" and "response_format" in extra:
        value = json.loads(message["content"])
        if "json_schema" in str(extra) and not (isinstance(value, dict)
                                                 and {"name", "age"} <= set(value)):
            raise Unexpected(f"answer misses the schema's keys: {value}")
    elif reason == "stop" and extra.get("tool_choice") == "required":
        raise Unexpected("tool_choice required but no tool call")


def sse_events(text: str) -> list[str]:
    """`data:` payloads of an SSE body; it must end with [DONE] and hold no error event."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise Unexpected(f"stream does not end with [DONE]: {text[-200:]!r}")
    for event in events[:-1]:
        if '"error"' in event and "error" in json.loads(event):
            raise Unexpected(f"error event: {event[:200]}")
    return events[:-1]


class Traffic:
    """The request kinds; each returns its outcome ('succeeded' or 'rejected as expected')."""

    def __init__(self, http: httpx.AsyncClient, model: str, max_tokens: int) -> None:
        self.http, self.model, self.max_tokens = http, model, max_tokens

    def chat_body(self, rng: random.Random, **extra: object) -> dict[str, object]:
        return {"model": self.model, "max_tokens": rng.randint(1, self.max_tokens),
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1000),
                **extra}

    async def chat(self, rng: random.Random) -> str:
        stop = rng.choice([None, ["."], ["\n", "e"]])
        body = self.chat_body(rng, stop=stop)
        r = await self.http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise Unexpected(f"status {r.status_code}: {r.text[:200]}")
        choice = r.json()["choices"][0]
        if choice["finish_reason"] not in ("stop", "length") or \
                not isinstance(choice["message"]["content"], str):
            raise Unexpected(f"bad choice {choice}")
        if stop and any(s in choice["message"]["content"] for s in stop):
            raise Unexpected(f"stop string in the output: {choice['message']['content']!r}")
        return "succeeded"

    async def chat_stream(self, rng: random.Random) -> str:
        body = self.chat_body(rng, stream=True, stream_options={"include_usage": True})
        r = await self.http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise Unexpected(f"status {r.status_code}: {r.text[:200]}")
        events = [json.loads(e) for e in sse_events(r.text)]
        if not events[-1].get("usage"):
            raise Unexpected("no usage chunk at the end")
        return "succeeded"

    async def completion(self, rng: random.Random) -> str:
        n = rng.choice([1, 2, 3])
        body = {"model": self.model, "prompt": rng.choice(PROMPTS), "n": n,
                "max_tokens": rng.randint(1, self.max_tokens), "seed": rng.randrange(1000),
                "temperature": 0.8, "stream": rng.random() < 0.5}
        r = await self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise Unexpected(f"status {r.status_code}: {r.text[:200]}")
        if body["stream"]:
            indexes = {c["index"] for e in sse_events(r.text) for c in json.loads(e)["choices"]}
        else:
            indexes = {c["index"] for c in r.json()["choices"]}
        if indexes != set(range(n)):
            raise Unexpected(f"choices {sorted(indexes)} for n={n}")
        return "succeeded"

    async def hang_up(self, rng: random.Random) -> str:
        """Stream, read 0 to 3 events, then close the connection mid-stream."""
        body = self.chat_body(rng, stream=True, max_tokens=self.max_tokens * 4,
                              ignore_eos=True)
        keep = rng.randint(0, 3)
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise Unexpected(f"status {r.status_code}")
            seen = 0
            async for line in r.aiter_lines():
                if seen >= keep:
                    break
                seen += line.startswith("data: ")
        return "succeeded"

    async def ollama_chat(self, rng: random.Random) -> str:
        stream = rng.random() < 0.5
        body = {"model": self.model, "stream": stream,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "options": {"num_predict": rng.randint(1, self.max_tokens),
                            "seed": rng.randrange(1000)}}
        r = await self.http.post("/api/chat", json=body)
        if r.status_code != 200:
            raise Unexpected(f"status {r.status_code}: {r.text[:200]}")
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        if not lines or not lines[-1].get("done") or any("error" in x for x in lines):
            raise Unexpected(f"bad NDJSON ending: {r.text[-200:]!r}")
        return "succeeded"

    async def structured(self, rng: random.Random) -> str:
        """Tools or a response_format: 200, or a 400 naming the field (not yet supported)."""
        extra = rng.choice([
            {"tools": [WEATHER_TOOL], "tool_choice": "auto"},
            {"tools": [WEATHER_TOOL], "tool_choice": "required"},
            {"response_format": {"type": "json_object"}},
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}}])
        r = await self.http.post("/v1/chat/completions", json=self.chat_body(rng, **extra))
        if r.status_code == 200:
            check_structured(r.json()["choices"][0], extra)
            return "succeeded"
        check_error(r, (400,), ollama=False)
        return "rejected as expected"

    async def bad(self, rng: random.Random) -> str:
        """One of many malformed requests: its 4xx, in the right shape."""
        path, content, statuses = rng.choice(self.bad_requests(rng))
        r = await self.http.post(path, content=content,
                                 headers={"content-type": "application/json"})
        check_error(r, statuses, ollama=path.startswith("/api/"))
        return "rejected as expected"

    def bad_requests(self, rng: random.Random) -> list[tuple[str, bytes, tuple[int, ...]]]:
        good = self.chat_body(rng)

        def chat(**change: object) -> tuple[str, bytes, tuple[int, ...]]:
            return "/v1/chat/completions", json.dumps({**good, **change}).encode(), (400,)

        raw = json.dumps(good)[:-1]
        return [
            ("/v1/chat/completions", b"{not json", (400,)),
            ("/v1/chat/completions", b"[1, 2, 3]", (400,)),
            ("/v1/chat/completions", (raw + ', "temperature": NaN}').encode(), (400,)),
            ("/v1/chat/completions", (raw + ', "top_p": 1e999}').encode(), (400,)),
            ("/v1/chat/completions", json.dumps({**good, "model": "gpt-9"}).encode(), (404,)),
            chat(temperature=5), chat(top_p=0), chat(n=0), chat(n=1000), chat(max_tokens=0),
            chat(max_tokens=10**7), chat(messages=[]), chat(messages=[{"role": "wizard"}]),
            chat(messages="hi"), chat(stop=["a"] * 17), chat(stop=["x" * 300]),
            chat(logit_bias={str(i): 1 for i in range(301)}), chat(logit_bias={"x": 1}),
            chat(presence_penalty=9), chat(seed=-1), chat(top_logprobs=5), chat(guided_json={}),
            chat(tools=[5]), chat(response_format={"type": "grammar"}),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": [1, 10**9],
                                            "max_tokens": 2}).encode(), (400,)),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": "hi " * 9000,
                                            "max_tokens": 2}).encode(), (400,)),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": []}).encode(),
             (400,)),
            ("/api/chat", json.dumps({"model": self.model, "messages": [],
                                      "options": {"mirostat": 2}}).encode(), (400,)),
            ("/api/chat", json.dumps({"model": "nope", "messages": []}).encode(), (404,)),
            ("/api/chat", b'{"model": "x", "options": {"temperature": NaN}}', (400,)),
        ] + ([("/v1/chat/completions", b" " * (9 * 2**20), (413,))] if rng.random() < 0.02
             else [])


# kind name, weight
MIX = [("chat", 20), ("chat_stream", 15), ("completion", 15), ("hang_up", 8),
       ("ollama_chat", 10), ("structured", 8), ("bad", 24)]


async def client_loop(traffic: Traffic, tally: Tally, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        handler: Callable[[random.Random], Awaitable[str]] = getattr(traffic, kind)
        start = time.monotonic()
        try:
            outcome = await handler(rng)
            tally.record(kind, outcome, time.monotonic() - start)
        except (Unexpected, httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            tally.record(kind, "failed unexpectedly", detail=f"{type(e).__name__}: {e}")


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"/metrics has no {name}")
    return float(match.group(1))


async def idle_metrics(http: httpx.AsyncClient, timeout: float = 60) -> dict[str, float]:
    """Running, waiting and KV blocks in use, once nothing runs (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await http.get("/metrics")).text
        values = {n: metric(text, f"levante_{n}") for n in (
            "num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_total")}
        if (values["num_requests_running"] + values["num_requests_waiting"] == 0
                and values["kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.5)


def start_server(ref: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "levante.cli", "serve", ref, "--port",
                             str(port), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


async def soak(args: argparse.Namespace, base_url: str, pid: int | None) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 limits=httpx.Limits(max_connections=args.clients * 2)) as http:
        if (await http.get("/health")).status_code != 200:
            raise SystemExit("/health is not 200 before the soak")
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        traffic = Traffic(http, model, args.max_tokens)
        rss_start = rss_mib(pid)
        tally = Tally()
        start = time.monotonic()
        await asyncio.gather(*(client_loop(traffic, tally, args.seed + i, start + args.duration)
                               for i in range(args.clients)))
        elapsed = time.monotonic() - start
        idle = await idle_metrics(http)
        health = (await http.get("/health")).status_code
        rss_end = rss_mib(pid)
    return report(args, tally, elapsed, idle, health, rss_start, rss_end)


def report(args: argparse.Namespace, tally: Tally, elapsed: float, idle: dict[str, float],
           health: int, rss_start: float | None, rss_end: float | None) -> int:
    sent = sum(tally.outcomes.values())
    failed = tally.outcomes["failed unexpectedly"]
    lat = tally.latencies
    print(f"soak: {elapsed:.0f} s, {args.clients} clients, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"requests sent:          {sent}")
    print(f"succeeded:              {tally.outcomes['succeeded']}")
    print(f"rejected as expected:   {tally.outcomes['rejected as expected']}")
    print(f"failed unexpectedly:    {failed}")
    print(f"latency (succeeded):    p50 {percentile(lat, 50):.3f} s, p95 {percentile(lat, 95):.3f} s")
    fmt = lambda v: "n/a" if v is None else f"{v:.0f} MiB"
    print(f"server RSS:             start {fmt(rss_start)}, end {fmt(rss_end)}")
    print(f"idle after the soak:    KV blocks used {idle['kv_blocks_used']:.0f} of "
          f"{idle['kv_blocks_total']:.0f}, running {idle['num_requests_running']:.0f}, "
          f"waiting {idle['num_requests_waiting']:.0f}, /health {health}")
    for (kind, outcome), count in sorted(tally.kinds.items()):
        print(f"  {kind:12s} {outcome:22s} {count}")
    for failure in tally.failures:
        print(f"  FAILED {failure}")
    is_ok = failed == 0 and idle["kv_blocks_used"] == 0 and health == 200
    print("invariants:", "hold" if is_ok else "BROKEN")
    return 0 if is_ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--base-url", help="a running server (else one is started)")
    parser.add_argument("--server-pid", type=int, help="its pid, for RSS (with --base-url)")
    parser.add_argument("--ref", default="smollm2", help="model to serve when starting one")
    parser.add_argument("--serve-args", default="", help="extra `levante serve` options")
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proc = None
    if args.base_url:
        base_url, pid = args.base_url.rstrip("/"), args.server_pid
    else:
        proc, base_url = start_server(args.ref, args.serve_args.split())
        pid = proc.pid
    try:
        code = asyncio.run(soak(args, base_url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    sys.exit(code)


if __name__ == "__main__":
    main()
