"""Every error path answers in OpenAI's shape with the right status, and the server goes on."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from tests.server.conftest import start_server

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:  # "messages.0" names a field of "messages"
        assert error["param"] is not None and error["param"].split(".")[0] == param
    return error


def _still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", "many"), ("temperature", -1), ("temperature", 3),
    ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 1000), ("presence_penalty", 5),
    ("frequency_penalty", -3), ("seed", -1), ("top_logprobs", 50), ("stop", 5),
    ("messages", []), ("messages", "hello"), ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 1000}), ("stop", ["x"] * 100),
])
def test_bad_parameters_are_400_naming_the_field(http, field, value) -> None:
    error = _error(http.post("/v1/chat/completions", json={**CHAT, field: value}), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field


def test_bad_messages(http) -> None:
    for messages in ([{"role": "wizard", "content": "x"}], [{"content": "x"}],
                     [{"role": "user"}], ["just a string"]):
        _error(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400,
               "messages")
    _still_serving(http)


def test_malformed_and_non_object_bodies(http) -> None:
    for content in (b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"):
        _error(http.post("/v1/chat/completions", content=content,
                         headers={"content-type": "application/json"}), 400)
    _error(http.post("/v1/chat/completions", json={"messages": CHAT["messages"]}), 400,
           "model")
    _still_serving(http)


def test_unknown_model_is_404(http) -> None:
    error = _error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404,
                   "model")
    assert error["code"] == "model_not_found"


def test_context_length_exceeded_gives_both_numbers(http, server) -> None:
    limit = server.engine.config.max_model_len
    prompt = "hello " * (limit + 10)
    error = _error(http.post("/v1/completions", json={"model": "smollm2", "prompt": prompt,
                                                      "max_tokens": 4}), 400)
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
    ids = [28] * (limit - 10)
    error = _error(http.post("/v1/completions", json={"model": "smollm2", "prompt": ids,
                                                      "max_tokens": 20}), 400)
    assert f"{limit - 10} tokens" in error["message"] and "20" in error["message"]
    # exactly at the limit is fine
    ok = http.post("/v1/completions", json={"model": "smollm2", "prompt": ids,
                                            "max_tokens": 10, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 10


def test_out_of_vocabulary_token_ids(http) -> None:
    _error(http.post("/v1/completions", json={"model": "smollm2", "prompt": [1, 10**9],
                                              "max_tokens": 2}), 400, "prompt")


def test_constraints_we_do_not_implement_are_refused(http) -> None:
    _error(http.post("/v1/chat/completions", json={**CHAT, "guided_json": {}}), 400,
           "guided_json")
    _error(http.post("/v1/chat/completions",
                     json={**CHAT, "response_format": {"type": "grammar"}}), 400,
           "response_format")
    # vendor extras that don't constrain output are ignored
    assert http.post("/v1/chat/completions",
                     json={**CHAT, "vendor_extra": 1, "user": "u1"}).status_code == 200


def test_body_over_limit_is_413(http) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}
    _error(http.post("/v1/chat/completions", json=big), 413)
    _still_serving(http)


def test_disconnects_free_every_block(server) -> None:
    """50 streaming requests, 10 of which hang up mid-stream: every block is free after."""

    async def main() -> int:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x",
                                    max_retries=0)

        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": f"Count to {i}"}],
                max_tokens=24, temperature=0.5, seed=i, stream=True)
            count = 0
            async for _ in stream:
                count += 1
                if i % 5 == 0 and count == 3:
                    await stream.close()
                    break
            return count

        results = await asyncio.gather(*(one(i) for i in range(50)))
        return len(results)

    assert asyncio.run(main()) == 50
    server.wait_idle(timeout=30)
    assert server.engine.pool.num_free == server.engine.pool.num_blocks
    assert not server.engine.scheduler.running and not server.engine.scheduler.waiting


def test_api_key_and_queue_limit(smollm2_bundle) -> None:
    for live in start_server("smollm2", smollm2_bundle, api_key="s3cret", max_queue=2,
                             max_num_seqs=1):
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # public
            _error(http.get("/v1/models"), 401)
            _error(http.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": "Bearer wrong"}), 401)
            auth = {"Authorization": "Bearer s3cret"}
            assert http.get("/v1/models", headers=auth).status_code == 200
            _error(http.get("/v1/models", headers={**auth, "Host": "evil.example:8000"}), 403)
            statuses = _flood(live.base_url, auth, 6)
            assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
            assert 503 in statuses
        live.wait_idle(timeout=30)


def _flood(base_url: str, headers: dict, count: int) -> list[int]:
    statuses: list[int] = []
    body = {**CHAT, "max_tokens": 32, "ignore_eos": True}

    def one() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json=body, headers=headers)
            if r.status_code == 503:
                assert r.headers.get("retry-after") and r.json()["error"]["code"]
            statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses
