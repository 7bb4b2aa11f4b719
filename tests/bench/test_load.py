"""The load generator against a fake OpenAI server whose token schedule the test sets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from levante.bench.load import BenchConfig, run_bench
from levante.bench.report import plot_report, read_report, report_table
from levante.bench.scenarios import PromptBuilder, Scenario

TTFT_S = 0.8  # the fake's delay before its first token
GAP_S = 0.04  # then one token every 40 ms: 25 tokens/s per stream
NATURAL_LEN = 5  # tokens the fake sends when not told to ignore EOS
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_app() -> FastAPI:
    """Streams max_tokens chunks on an absolute schedule (sleep errors do not accumulate).

    The model "strict-model" rejects ignore_eos, as OpenAI's own API does; GET /bodies returns
    the request bodies seen so far.
    """
    app = FastAPI()
    bodies: list[dict[str, Any]] = []

    @app.get("/bodies")
    async def seen() -> list[dict[str, Any]]:
        return bodies

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model",
                                            "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        bodies.append(body)
        if body["model"] == "strict-model" and "ignore_eos" in body:
            return JSONResponse({"error": {"message": "Unrecognized request argument supplied: "
                                           "ignore_eos", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        num_tokens = body["max_tokens"] if body.get("ignore_eos") else NATURAL_LEN
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "length",
                                 "message": {"role": "assistant", "content": "hi"}}]}
        return StreamingResponse(_events(body, num_tokens), media_type="text/event-stream")

    return app


async def _events(body: dict[str, Any], num_tokens: int) -> AsyncIterator[str]:
    start = time.perf_counter()

    def chunk(delta: dict[str, Any], **extra: Any) -> str:
        return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                      "model": body["model"], **extra,
                                      "choices": [{"index": 0, "delta": delta,
                                                   "finish_reason": None}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})  # a role-only chunk: not a token
    for i in range(num_tokens):
        await asyncio.sleep(max(0.0, start + TTFT_S + i * GAP_S - time.perf_counter()))
        yield chunk({"content": f" t{i}"})
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 123, "completion_tokens": num_tokens,
                 "total_tokens": 123 + num_tokens}
        yield "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                     "model": body["model"], "choices": [],
                                     "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    """The fake in its own process, so its timing does not share a GIL with the client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import runpy, uvicorn; app = runpy.run_path({__file__!r})['fake_app'](); "
            f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "fake did not start"
                time.sleep(0.1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bodies(url: str) -> list[dict[str, Any]]:
    return httpx.get(url.removesuffix("/v1") + "/bodies").json()


@pytest.fixture()
def builder() -> PromptBuilder:
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3
                       for i in range(20))
    return PromptBuilder(text)  # no tokenizer: approximate lengths, like a remote model


def test_measures_the_fake_schedule(fake_server: str, builder: PromptBuilder,
                                    tmp_path: Path) -> None:
    url = fake_server
    num_seen = len(bodies(url))
    num_tokens = 16
    scenario = Scenario("custom", 200, num_tokens)
    config = BenchConfig(base_url=url, concurrency=(1, 4), num_requests=4)
    report = run_bench(config, [scenario], builder, progress=False)
    assert report.model == "fake-model" and report.ignore_eos
    e2e = TTFT_S + (num_tokens - 1) * GAP_S
    for level in report.levels:
        assert level.num_requests == 4 and level.num_errors == 0
        assert level.ttft_p50 == pytest.approx(TTFT_S, rel=0.1)
        assert level.itl_p50 == pytest.approx(GAP_S, rel=0.1)
        assert level.stream_tokens_per_s == pytest.approx(1 / GAP_S, rel=0.1)
        assert level.e2e_p50 == pytest.approx(e2e, rel=0.1)
        assert level.mean_output_tokens == num_tokens and level.token_source == "usage"
        assert level.mean_prompt_tokens == 123
        # 4 requests: one after another at x1, all together at x4
        expected_total = level.concurrency * num_tokens / e2e
        assert level.aggregate_tokens_per_s == pytest.approx(expected_total, rel=0.1)
    streamed = [b for b in bodies(url)[num_seen:] if b.get("stream")]
    assert len(streamed) == 8
    assert all(b["max_tokens"] == num_tokens and b["ignore_eos"] for b in streamed)

    out = tmp_path / "bench.json"
    out.write_text(json.dumps(report.to_json()))
    assert read_report(out) == report
    png = tmp_path / "bench.png"
    plot_report(report, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (500, 1200)  # 12 x 5 inches at 100 dpi
    assert report_table(report).row_count == 2


def test_server_without_ignore_eos_reports_real_lengths(fake_server: str,
                                                        builder: PromptBuilder) -> None:
    config = BenchConfig(base_url=fake_server, model="strict-model", num_requests=2)
    report = run_bench(config, [Scenario("custom", 100, 50)], builder, progress=False)
    assert not report.ignore_eos and report.model == "strict-model"
    assert report.levels[0].mean_output_tokens == NATURAL_LEN  # not the 50 asked for
    assert report.levels[0].num_errors == 0


def test_duration_mode_and_unreachable_server(fake_server: str, builder: PromptBuilder) -> None:
    from levante.errors import ConfigError

    url = fake_server
    config = BenchConfig(base_url=url, concurrency=(2,), duration_s=0.5)
    report = run_bench(config, [Scenario("custom", 50, 3)], builder, progress=False)
    level = report.levels[0]
    assert level.num_requests >= 2 and level.num_errors == 0  # in-flight ones finish
    with pytest.raises(ConfigError, match="probe request failed"):
        run_bench(BenchConfig(base_url="http://127.0.0.1:9/v1"), [Scenario("c", 5, 5)],
                  builder, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        BenchConfig(base_url=url, num_requests=3, duration_s=1.0)
