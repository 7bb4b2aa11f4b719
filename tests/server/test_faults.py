"""Faults: a failing model step fails only its requests; a slow reader stalls nobody."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from tests.server.conftest import fail_model_step, free_port

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}


def test_model_step_exception_fails_requests_and_engine_goes_on(server, monkeypatch) -> None:
    fail_model_step(server, monkeypatch, on_call=1, message="injected fault")
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        failed = http.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 500
        assert "injected fault" in failed.json()["error"]["message"]
        stream = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert stream.status_code == 200
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    server.wait_idle()
    assert server.engine.pool.num_free == server.engine.pool.num_blocks


def test_error_mid_stream_is_an_error_event_then_done(server, monkeypatch) -> None:
    fail_model_step(server, monkeypatch, on_call=3, message="fault mid-stream")
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {**CHAT, "max_tokens": 20, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "fault mid-stream" in events[-2]
    server.wait_idle()


def test_slow_reader_does_not_stall_others(server) -> None:
    async def main() -> float:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x",
                                    max_retries=0)
        slow = await client.chat.completions.create(
            model="smollm2", messages=CHAT["messages"], max_tokens=40, stream=True,
            extra_body={"ignore_eos": True})
        await slow.__anext__()  # read one chunk, then stop reading for a while
        start = time.monotonic()
        fast = await asyncio.gather(*(client.chat.completions.create(
            model="smollm2", messages=CHAT["messages"], max_tokens=8) for _ in range(3)))
        elapsed = time.monotonic() - start
        assert all(r.choices[0].message.content is not None for r in fast)
        rest = [c async for c in slow]
        assert rest and rest[-1].choices[0].finish_reason == "length"
        return elapsed

    asyncio.run(main())
    server.wait_idle()


def _wait_healthy(proc: subprocess.Popen, base: str) -> None:
    """Until the server process answers /health (it must not exit first)."""
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def test_sigterm_drains_then_exits(smollm2_gguf) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "levante.cli", "serve", str(smollm2_gguf),
                             "--port", str(port), "--max-model-len", "512", "--no-web"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        body = {"model": str(smollm2_gguf), "prompt": "Count:", "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.5)  # the signal is handled between the server's 0.1 s ticks
            refused = httpx.post(base + "/v1/completions", json={**body, "stream": False})
            health = httpx.get(base + "/health")
            rest = [line for line in lines if line.startswith("data: ")]
        assert first and rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in rest[-2]  # the accepted request finished
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutdown"
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert proc.wait(timeout=60) == 0  # drained: a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()


def test_one_requests_broken_logits_fail_it_alone(server, monkeypatch) -> None:
    """NaN logits in one row (broken weights for one adapter, say): that request ends with a
    500 naming the cause, its batch neighbours finish as they would alone."""
    runner = server.engine.runner
    original = runner.run
    poisoned_prompt_len: dict[str, int] = {}

    def poison(batch):
        logits, rows = original(batch)
        logits = logits.clone()  # an inference tensor: not writable outside inference mode
        for j, i in enumerate(rows):
            if batch.requests[i].num_prompt_tokens == poisoned_prompt_len.get("n"):
                logits[j] = float("nan")
        return logits, rows

    body = {**CHAT, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    poisoned = {**body, "messages": [{"role": "user", "content": "Tell me a long story"}]}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        alone = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        poisoned_prompt_len["n"] = http.post("/v1/chat/completions", json={
            **poisoned, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        monkeypatch.setattr(runner, "run", poison)

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                return list(await asyncio.gather(
                    client.post("/v1/chat/completions", json=poisoned),
                    client.post("/v1/chat/completions", json=body)))

        bad, good = asyncio.run(both())
    assert bad.status_code == 500 and "not finite" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0] == alone
    server.wait_idle()
    assert server.engine.pool.num_free == server.engine.pool.num_blocks


DYING_SERVER = """
import sys
from levante.engine.engine import Engine
from levante.server.app import serve
from levante.server.config import ServerConfig

step, calls = Engine.step, [0]

def dies_at_the_fifth_step(self):
    calls[0] += 1
    if calls[0] == 5:
        raise RuntimeError("injected engine bug")
    return step(self)

Engine.step = dies_at_the_fifth_step
serve(ServerConfig(ref=sys.argv[1], port=int(sys.argv[2]), max_model_len=512, no_web=True))
"""


def test_engine_death_ends_every_request_and_exits_non_zero(smollm2_gguf) -> None:
    """The engine loop dies mid-stream: the stream ends with an error event and [DONE] at
    once (no hang), then the process exits with status 1 for its supervisor to restart."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVER, str(smollm2_gguf), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        body = {"model": str(smollm2_gguf), "prompt": "Count:", "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2] and "injected engine bug" in events[-2]
        assert proc.wait(timeout=60) == 1
        assert b"the engine stopped" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
