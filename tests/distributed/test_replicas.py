"""Replicas behind one front: routing rules, streaming passthrough and failover over stand-in
upstreams, and 2 real SmolLM2 servers taking 16 concurrent openai clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from levante.distributed.replicas import Replica, Router, create_front, routing_key, start_replicas
from levante.server.config import ServerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _routed(metrics_text: str) -> dict[str, float]:
    pattern = r'levante_front_requests_routed_total\{replica="([^"]+)"\} (\S+)'
    return {url: float(v) for url, v in re.findall(pattern, metrics_text)}


def test_fewest_in_flight_wins_and_ties_alternate() -> None:
    router = Router([Replica("a"), Replica("b")], prefix_aware=False)
    first, second = router.ranked(None)[0], router.ranked(None)[0]
    assert {first.url, second.url} == {"a", "b"}
    router.replicas[0].num_in_flight = 3
    assert [router.ranked(None)[0].url for _ in range(4)] == ["b"] * 4


def test_same_conversation_goes_to_the_same_replica_within_the_load_bound() -> None:
    router = Router([Replica(u) for u in ("a", "b", "c")], prefix_aware=True, max_imbalance=2)
    turn1 = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi"}]}
    turn2 = {"messages": turn1["messages"] + [{"role": "assistant", "content": "hello"},
                                              {"role": "user", "content": "more"}]}
    key1, key2 = (routing_key(json.dumps(t).encode()) for t in (turn1, turn2))
    assert key1 == key2 is not None
    home = router.ranked(key1)[0]
    assert all(router.ranked(key2)[0] is home for _ in range(5))
    homes = {router.ranked(routing_key(json.dumps({"prompt": f"story {i}"}).encode()))[0].url
             for i in range(30)}
    assert homes == {"a", "b", "c"}  # different prompts spread
    home.num_in_flight = 3  # over the least loaded (0) + 2: load wins
    assert router.ranked(key1)[0] is not home
    assert routing_key(b"not json") is None and routing_key(b"") is None


def _stand_in(name: str, closed: threading.Event | None = None) -> FastAPI:
    """An upstream that streams three SSE events, or (at /slow) until its client leaves."""
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> StreamingResponse:
        async def forever() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: tick\n\n"
                    await asyncio.sleep(0.05)
            finally:
                if closed is not None:
                    closed.set()

        return StreamingResponse(forever(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {json.dumps({'replica': name, 'i': i})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        assert request.headers["authorization"] == "Bearer k"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-model": body["model"]})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def test_front_streams_through_and_skips_a_dead_replica() -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(_serving(_stand_in("live")))
        front = stack.enter_context(_serving(create_front([dead, live], prefix_aware=False)))
        for _ in range(4):
            r = httpx.post(front + "/v1/chat/completions", json={"model": "m"},
                           headers={"Authorization": "Bearer k"})
            assert r.status_code == 200 and r.headers["x-model"] == "m"
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert [json.loads(e[6:])["i"] for e in events[:-1]] == [0, 1, 2]
        metrics = httpx.get(front + "/metrics").text
        health = httpx.get(front + "/health").json()
    assert _routed(metrics) == {dead: 0.0, live: 4.0}
    assert re.search(rf'levante_front_requests_failed_total\{{replica="{dead}"\}} [1-9]', metrics)
    assert health["replicas"] == {dead: False, live: True}


def test_a_client_leaving_mid_stream_releases_the_replica() -> None:
    closed = threading.Event()
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(_serving(_stand_in("live", closed)))
        front = stack.enter_context(_serving(create_front([live])))
        with httpx.stream("GET", front + "/slow") as r:
            assert next(r.iter_lines()) == "data: tick"
        assert closed.wait(10), "the upstream stream was not closed"
        deadline = time.monotonic() + 10
        idle = r'levante_front_requests_in_flight\{replica="[^"]+"\} 0\.0'
        while not re.search(idle, httpx.get(front + "/metrics").text):
            assert time.monotonic() < deadline, "the front still counts the request in flight"
            time.sleep(0.05)


def test_two_smollm2_replicas_serve_16_concurrent_clients(smollm2_gguf: Path) -> None:
    config = ServerConfig(ref=str(smollm2_gguf), max_model_len=512, max_num_seqs=8,
                          max_num_batched_tokens=256, served_model_name="smollm2", no_web=True)
    replicas = start_replicas(config, 2)
    try:
        replicas.wait_ready(timeout_s=300)
        with _serving(create_front(replicas.urls)) as front:
            client = openai.OpenAI(base_url=front + "/v1", api_key="none", max_retries=0,
                                   timeout=300)

            def ask(i: int) -> str:
                r = client.chat.completions.create(
                    model="smollm2", max_tokens=4, temperature=0,
                    messages=[{"role": "user", "content": f"Count to {i}."}])
                return r.choices[0].finish_reason

            with ThreadPoolExecutor(16) as pool:
                reasons = list(pool.map(ask, range(16)))
            metrics = httpx.get(front + "/metrics").text
    finally:
        replicas.stop()
    assert all(reason in ("stop", "length") for reason in reasons)
    routed = _routed(metrics)
    assert sum(routed.values()) == 16 and min(routed.values()) >= 1, routed
    assert re.findall(r"levante_front_requests_in_flight\{[^}]*\} (\S+)", metrics) == ["0.0"] * 2
    print(f"\nrequests per replica: {routed}")
