"""A Ray Serve engine replica without Ray: the app answers through `respond` as over a socket
(whole and streamed), routing fields are read from bodies, and the health check fails once
the engine has died. The Ray cluster tests are in test_ray_serve.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from levante.distributed.ray_replica import (
    EngineReplica,
    ProxiedRequest,
    ResponseHead,
)
from levante.distributed.ray_router import rendezvous_rank
from levante.server.config import ServerConfig

CHAT = {"model": "smollm2", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="module")
def replica(smollm2_gguf: Path) -> Iterator[EngineReplica]:
    replica = EngineReplica(ServerConfig(ref=str(smollm2_gguf), served_model_name="smollm2",
                                         max_model_len=512, max_num_seqs=4, no_web=True))
    yield replica
    replica.state.engine.stop()


def _post(path: str, body: dict) -> ProxiedRequest:
    headers = ((b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"))
    return ProxiedRequest.of("POST", path, b"", headers, json.dumps(body).encode())


def _collect(replica: EngineReplica, request: ProxiedRequest) -> tuple[ResponseHead, bytes]:
    async def run() -> tuple[ResponseHead, bytes]:
        items = [item async for item in replica.respond(request)]
        head = items[0]
        assert isinstance(head, ResponseHead)
        assert all(isinstance(chunk, bytes) for chunk in items[1:])
        assert not head.is_complete or len(items) == 1  # a complete head ends the call
        return head, head.body + b"".join(items[1:])  # type: ignore[arg-type]

    return asyncio.run(run())


def test_routing_fields_come_from_the_body() -> None:
    chat = _post("/v1/chat/completions", CHAT)
    turn2 = _post("/v1/chat/completions", {**CHAT, "messages": CHAT["messages"] + [
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]})
    assert chat.routing_key is not None and chat.messages == CHAT["messages"]
    assert turn2.routing_key != chat.routing_key  # the first two messages differ
    prompt = _post("/v1/completions", {"prompt": "x" * 600})
    assert prompt.routing_key == b'"' + b"x" * 512 + b'"' and prompt.prompt == "x" * 600
    assert ProxiedRequest.of("GET", "/v1/models", b"", (), b"").routing_key is None
    assert ProxiedRequest.of("POST", "/v1/chat/completions", b"", (), b"{bad").routing_key is None


def test_rendezvous_rank_keeps_a_key_home_when_others_leave() -> None:
    class Fake:
        def __init__(self, name: str) -> None:
            self.replica_id = type("Id", (), {"unique_id": name})()

    replicas = [Fake(f"r{i}") for i in range(4)]
    for key in (b"a", b"b", b"c", b"d"):
        home = rendezvous_rank(key, replicas)[0]  # type: ignore[arg-type]
        rest = [r for r in replicas if r is not home]
        assert rendezvous_rank(key, rest[:2] + [home])[0] is home  # type: ignore[arg-type]


def test_respond_answers_whole_and_streamed(replica: EngineReplica) -> None:
    head, body = _collect(replica, _post("/v1/chat/completions", CHAT))
    assert head.status == 200 and head.replica.startswith("pid")
    assert head.is_complete and head.body == body  # sent with the head: one item, no relay
    whole = json.loads(body)["choices"][0]["message"]["content"]
    head, body = _collect(replica, _post("/v1/chat/completions", {**CHAT, "stream": True}))
    assert dict(head.headers)[b"content-type"].startswith(b"text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    streamed = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if json.loads(e[6:])["choices"])
    assert streamed == whole != ""


def test_respond_keeps_the_apps_errors_and_guards(replica: EngineReplica) -> None:
    head, body = _collect(replica, _post("/v1/chat/completions", {"model": "smollm2"}))
    assert head.status == 400 and json.loads(body)["error"]["param"] == "messages"
    evil = ProxiedRequest.of("GET", "/v1/models", b"", ((b"host", b"evil.example"),), b"")
    head, _ = _collect(replica, evil)
    assert head.status == 403


def test_a_stream_left_early_is_aborted(replica: EngineReplica) -> None:
    async def leave_after_two_chunks() -> None:
        stream = replica.respond(_post("/v1/completions", {
            "model": "smollm2", "prompt": "Count:", "max_tokens": 200, "ignore_eos": True,
            "stream": True}))
        async for item in stream:
            if isinstance(item, bytes) and b"[DONE]" not in item:
                break
        await stream.aclose()

    asyncio.run(leave_after_two_chunks())
    engine = replica.state.engine
    for _ in range(100):
        if engine.num_active == 0 and not engine.engine.has_work:
            return
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError("the abandoned request still runs")


def test_health_check_fails_once_the_engine_died(replica: EngineReplica,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    replica.check_health()
    engine = replica.state.engine.engine

    def broken_step() -> None:
        raise RuntimeError("injected engine bug")

    monkeypatch.setattr(engine, "step", broken_step)
    head, _ = _collect(replica, _post("/v1/chat/completions", CHAT))
    assert head.status in (500, 503)
    with pytest.raises(RuntimeError, match="injected engine bug"):
        replica.check_health()


def test_serve_run_args_are_typed_and_checked() -> None:
    from levante.distributed.ray_serve import RayServeConfig, app_builder
    from levante.errors import ConfigError

    app_builder({"ref": "smollm2", "max_model_len": "512", "no_web": "true",
                 "min_replicas": "1", "max_replicas": "3", "num_cpus": "0.5"})
    with pytest.raises(ConfigError, match="unknown app_builder args: bogus"):
        app_builder({"ref": "smollm2", "bogus": "1"})
    with pytest.raises(ConfigError, match="max_num_seqs: 'many' is not a int"):
        app_builder({"ref": "smollm2", "max_num_seqs": "many"})
    with pytest.raises(ConfigError, match=r"min \(3\) <= max \(2\)"):
        RayServeConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="router must be one of"):
        RayServeConfig(router="random")
