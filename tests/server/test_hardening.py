"""Hardening (issue 9): non-finite JSON, admission against the KV cache, context limits for
chat, stop/logit_bias caps, disconnects at every stage, the API key kept out of logs, no CORS
wildcard, memory back to baseline. After each group: still serving, nothing leaked."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
MESSAGES = '[{"role": "user", "content": "Hi"}]'


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def assert_nothing_leaked(live: LiveServer) -> None:
    live.wait_idle(timeout=30)
    engine = live.engine
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests and not engine.texts
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - start


# --- numbers that are not numbers --------------------------------------------------------

@pytest.mark.parametrize("fragment", [
    '"temperature": NaN', '"top_p": Infinity', '"max_tokens": -Infinity',
    '"presence_penalty": 1e400', '"logit_bias": {"5": NaN}', '"vendor_extra": NaN',
    '"seed": Infinity', '"top_k": NaN', '"min_p": -1e999',
])
def test_non_finite_json_numbers_are_400(http, fragment: str) -> None:
    """Python's json reads NaN/Infinity (and 1e400 as inf); JSON has no such numbers."""
    body = f'{{"model": "smollm2", "messages": {MESSAGES}, "max_tokens": 2, {fragment}}}'
    error = error_of(http.post("/v1/chat/completions", content=body,
                               headers={"content-type": "application/json"}))
    assert "finite" in error["message"]
    ollama = http.post("/api/chat", content=f'{{"model": "smollm2", "messages": {MESSAGES}, '
                       '"options": {"num_predict": 2, "temperature": NaN}}')
    assert ollama.status_code == 400 and "finite" in ollama.json()["error"]


def test_absurd_json_is_400_not_500(http) -> None:
    for content in (b"[" * 100_000, b'{"model": 1%s}' % (b"0" * 5000)):
        error_of(http.post("/v1/chat/completions", content=content,
                           headers={"content-type": "application/json"}))
    assert http.get("/health").status_code == 200


# --- caps on stop strings and logit_bias -------------------------------------------------

def test_stop_string_caps(http) -> None:
    ok = http.post("/v1/chat/completions", json={**CHAT, "stop": ["z" * 256] * 16})
    assert ok.status_code == 200, ok.text
    for stop in (["z"] * 17, ["z" * 257], [""], "z" * 10_000):
        error = error_of(http.post("/v1/chat/completions", json={**CHAT, "stop": stop}))
        assert error["param"] == "stop"
        error = error_of(http.post("/v1/completions", json={"model": "smollm2", "prompt": "a",
                                                            "max_tokens": 2, "stop": stop}))
        assert error["param"] == "stop"


def test_logit_bias_caps(http) -> None:
    ok = http.post("/v1/chat/completions",
                   json={**CHAT, "logit_bias": {str(i): -1 for i in range(300)}})
    assert ok.status_code == 200, ok.text
    for bias in ({str(i): -1 for i in range(301)}, {"49152": 1}, {"-1": 1}, {"5": 101}):
        error = error_of(http.post("/v1/chat/completions", json={**CHAT, "logit_bias": bias}))
        assert error["param"] == "logit_bias"


# --- context limits, for chat too ---------------------------------------------------------

def chat_of_length(live: LiveServer, num_tokens: int) -> list[dict[str, str]]:
    """One user message whose chat prompt is exactly `num_tokens` tokens."""
    encode = live.state.bundle.chat_format.encode

    def messages(words: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": "Hi" + " hi" * words}]

    base = len(encode(messages(0)))
    words = num_tokens - base
    for candidate in (words, words - 1, words + 1):  # " hi" is one token; check, don't trust
        if candidate >= 0 and len(encode(messages(candidate))) == num_tokens:
            return messages(candidate)
    raise AssertionError(f"no chat prompt of exactly {num_tokens} tokens")


def test_chat_prompts_at_under_and_over_the_context(http, server) -> None:
    limit = server.engine.config.max_model_len
    under = chat_of_length(server, limit - 1)
    fits = http.post("/v1/chat/completions", json={**CHAT, "messages": under, "max_tokens": 1})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"] == {"prompt_tokens": limit - 1, "completion_tokens": 1,
                                    "total_tokens": limit}
    room = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": under})
    assert room.status_code == 200 and room.json()["choices"][0]["finish_reason"] == "length"
    over = [(under, 2), (chat_of_length(server, limit), None),
            (chat_of_length(server, limit + 1), None)]
    for messages, max_tokens in over:
        body = {"model": "smollm2", "messages": messages}
        if max_tokens:
            body["max_tokens"] = max_tokens
        error = error_of(http.post("/v1/chat/completions", json=body))
        assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_context(http, server, field: str) -> None:
    limit = server.engine.config.max_model_len
    body = {"model": "smollm2", "messages": CHAT["messages"], field: limit + 1}
    error = error_of(http.post("/v1/chat/completions", json=body))
    assert error["code"] == "context_length_exceeded" and str(limit + 1) in error["message"]


# --- admission against a small KV cache ---------------------------------------------------

@pytest.fixture(scope="module")
def small_kv(smollm2_bundle) -> Iterator[LiveServer]:
    """8 blocks of 16 tokens (128 tokens of KV) and 2 sequences at a time."""
    yield from start_server("smollm2", smollm2_bundle, num_kv_blocks=8, max_num_seqs=2,
                            max_queue=32)


def test_a_request_that_can_never_fit_is_refused_at_admission(small_kv) -> None:
    with httpx.Client(base_url=small_kv.base_url, timeout=120) as http:
        for n in (1, 16):
            start = time.monotonic()
            body = {**CHAT, "n": n, "max_tokens": 1000, "ignore_eos": True}
            error = error_of(http.post("/v1/chat/completions", json=body))
            assert error["code"] == "context_length_exceeded" and "KV cache" in error["message"]
            assert time.monotonic() - start < 5
            assert small_kv.state.engine.num_active == 0 and not small_kv.engine.has_work
        # n choices that fit one at a time but not together: preempted and finished, no hang
        body = {**CHAT, "n": 3, "max_tokens": 40, "ignore_eos": True}  # 5 blocks each
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert [c["finish_reason"] for c in response.json()["choices"]] == ["length"] * 3
        assert response.json()["usage"]["completion_tokens"] == 120
    assert_nothing_leaked(small_kv)


def test_more_choices_than_the_queue_holds_is_400(http, server) -> None:
    body = {"model": "smollm2", "prompt": ["a"] * 5, "n": 16, "max_tokens": 2}
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["param"] in ("n", "prompt")


# --- disconnects ---------------------------------------------------------------------------

class RawRequest:
    """An HTTP/1.1 POST on a plain socket, so a test decides exactly when to hang up."""

    def __init__(self, base_url: str, path: str, body: dict) -> None:
        url = urlparse(base_url)
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection((url.hostname, url.port), timeout=60)
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), len(payload), payload))
        self.received = b""

    def read_until(self, marker: bytes, count: int = 1) -> None:
        while self.received.count(marker) < count:
            chunk = self.sock.recv(65536)
            assert chunk, "server closed the connection"
            self.received += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def narrow(smollm2_bundle) -> Iterator[LiveServer]:
    """One sequence at a time, so a second request waits in the queue."""
    yield from start_server("smollm2", smollm2_bundle, max_num_seqs=1, max_queue=8)


def long_request(live: LiveServer) -> RawRequest:
    body = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    request = RawRequest(live.base_url, "/v1/chat/completions", body)
    request.read_until(b"data: ", 2)
    return request


@pytest.fixture()
def narrow_clean(narrow) -> Iterator[LiveServer]:
    """`narrow`, with whatever a failed test left running aborted afterwards."""
    yield narrow
    for request_id in list(narrow.engine.requests):
        narrow.state.engine.abort(request_id)
    narrow.wait_idle(timeout=30)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_while_queued_is_dropped_from_the_queue(narrow_clean, stream: bool) -> None:
    narrow = narrow_clean
    scheduler = narrow.engine.scheduler
    running = long_request(narrow)
    queued = RawRequest(narrow.base_url, "/v1/chat/completions", {**CHAT, "stream": stream})
    try:
        wait_for(lambda: len(scheduler.waiting) == 1, 10, "the second request is queued")
        queued.close()
        wait_for(lambda: not scheduler.waiting, 3, "the queued request is dropped")
        assert len(scheduler.running) == 1  # the first one goes on
        running.read_until(b"data: ", running.received.count(b"data: ") + 1)
    finally:
        queued.close()
        running.close()
    assert_nothing_leaked(narrow)


def test_a_request_that_can_never_run_is_400_even_while_the_queue_is_full(
        narrow_clean, monkeypatch) -> None:
    narrow = narrow_clean
    monkeypatch.setattr(narrow.state, "max_queue", 1)
    running = long_request(narrow)  # the queue (of 1) is now full
    try:
        with httpx.Client(base_url=narrow.base_url, timeout=60) as http:
            busy = http.post("/v1/chat/completions", json=CHAT)
            never = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**9})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        assert never.status_code == 400, never.text
        assert "maximum context length" in never.json()["error"]["message"]
    finally:
        running.close()
    assert_nothing_leaked(narrow)


@pytest.mark.parametrize("num_chunks", [0, 1, 10])
def test_disconnect_after_some_chunks_frees_everything(narrow_clean, num_chunks: int) -> None:
    narrow = narrow_clean
    body = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    request = RawRequest(narrow.base_url, "/v1/chat/completions", body)
    request.read_until(b"\r\n\r\n")  # the headers: the stream has begun
    if num_chunks:
        request.read_until(b"data: ", num_chunks)
    request.close()
    wait_for(lambda: not narrow.engine.has_work, 3, "the request is aborted")
    assert_nothing_leaked(narrow)


def test_disconnect_during_a_whole_response_frees_everything(narrow_clean) -> None:
    narrow = narrow_clean
    body = {**CHAT, "max_tokens": 1500, "ignore_eos": True}
    request = RawRequest(narrow.base_url, "/v1/chat/completions", body)
    wait_for(lambda: bool(narrow.engine.scheduler.running), 10, "the request runs")
    request.close()
    wait_for(lambda: not narrow.engine.has_work, 3, "the request is aborted")
    assert_nothing_leaked(narrow)


def test_a_chunked_body_over_the_limit_is_413_before_it_ends(server) -> None:
    """No Content-Length to check: the server must stop reading at the limit, not buffer on."""
    url = urlparse(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 2**16
        for _ in range(server.config.max_body_bytes // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = sock.recv(4096)  # the body never ends: only a server that stopped reading answers
    assert head.startswith(b"HTTP/1.1 413")


# --- the API key, CORS -----------------------------------------------------------------------

def test_the_api_key_never_appears_in_logs(smollm2_bundle, caplog) -> None:
    key, wrong = "sk-levante-0d2f9e7c41", "sk-wrong-5b8a3c6e"
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "levante")]
    levels = [lg.level for lg in loggers]
    caplog.set_level(logging.DEBUG)
    for live in start_server("smollm2", smollm2_bundle, api_key=key):
        for lg in loggers:
            lg.addHandler(caplog.handler)
            lg.setLevel(logging.DEBUG)
        try:
            with httpx.Client(base_url=live.base_url, timeout=60) as http:
                for headers in ({"Authorization": f"Bearer {key}"},
                                {"Authorization": f"Bearer {wrong}"}, {"Authorization": wrong}):
                    http.post("/v1/chat/completions", json=CHAT, headers=headers)
                    http.post("/v1/chat/completions", content=b"{bad", headers=headers)
                    http.post("/api/chat", json={**CHAT, "x": 1}, headers=headers)
                    http.get("/v1/models", headers=headers)
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(caplog.handler)
                lg.setLevel(level)
        assert key not in repr(live.config)
    messages = [r.getMessage() for r in caplog.records]
    assert any("/v1/chat/completions" in m for m in messages)  # the access log was captured
    assert not [m for m in messages if key in m or wrong in m]


def test_no_cors_wildcard_by_default(http) -> None:
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    response = http.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    response = http.post("/v1/chat/completions", json=CHAT,
                         headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_the_configured_origins(smollm2_bundle) -> None:
    for live in start_server("smollm2", smollm2_bundle, api_key="k3y",
                             cors_origins=("http://app.example",)):
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            def preflight(origin: str) -> httpx.Response:
                return http.options("/v1/chat/completions", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST"})

            allowed = preflight("http://app.example")
            assert allowed.headers["access-control-allow-origin"] == "http://app.example"
            refused = preflight("http://evil.example")
            assert refused.headers.get("access-control-allow-origin") in (None, "")


# --- Host header: DNS rebinding (issue 20) -------------------------------------------------

# Names that only look loopback: anyone can point them at 127.0.0.1 and read the API from a
# page they serve (DNS rebinding), so a loopback-bound server refuses them.
REBOUND_HOSTS = ["127.attacker.example", "127.0.0.1.evil.com", "localhost.evil.com",
                 "127.attacker.example:8000", "localhost.evil.com.", "[127.0.0.1]", "::1:80",
                 "localhost:8000@evil.com", "evil.com#localhost", "localhost:", "0.0.0.0", ""]
LOOPBACK_HOSTS = ["localhost", "localhost:8000", "LOCALHOST", "LocalHost:8000", "localhost.",
                  "localhost.:8000", "127.0.0.1", "127.0.0.1:8000", "127.9.8.7", "[::1]",
                  "[::1]:8000", "::1"]


@pytest.mark.parametrize("host", REBOUND_HOSTS)
def test_names_that_only_look_loopback_are_refused(http, host: str) -> None:
    error = error_of(http.get("/v1/models", headers={"Host": host}), 403)
    assert error["code"] == "forbidden_host" and error["type"] == "invalid_request_error"
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_loopback_names_and_addresses_pass(http, host: str) -> None:
    assert http.get("/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(("header", "name"), [
    ("LOCALHOST.:8000", "localhost"), ("[::1]:8000", "::1"), ("[::1]", "::1"), ("::1", "::1"),
    ("[0:0:0:0:0:0:0:1]", "0:0:0:0:0:0:0:1"), ("Api.Example.", "api.example"),
    ("[::1]x", None), ("[::1", None), ("a b", None), ("x:y", None), ("x:123456", None),
    ("localhost..", None), ("ex ample.com:80", None), ("\u212aelvin.example", None)])
def test_host_header_parsing(header: str, name: str | None) -> None:
    from levante.server.hosts import host_name

    assert host_name(header) == name


def test_allowed_hosts_extend_the_loopback_names(smollm2_bundle) -> None:
    for live in start_server("smollm2", smollm2_bundle, allowed_hosts=("Levante.Test.", "::2")):
        assert live.config.allowed_hosts == ("levante.test", "::2")
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            for host in ("levante.test", "LEVANTE.test:8000", "levante.test.", "[::2]:80",
                         "localhost"):
                assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
            for host in ("evil.levante.test", "levante.test.evil.com", "127.levante.test"):
                error = error_of(http.get("/v1/models", headers={"Host": host}), 403)
                assert error["code"] == "forbidden_host"
            assert http.get("/v1/models").status_code == 200


def test_a_server_bound_beyond_loopback_keeps_no_host_check(smollm2_bundle) -> None:
    # The guard reads config.host; the test server itself still listens on 127.0.0.1.
    for live in start_server("smollm2", smollm2_bundle, host="0.0.0.0", api_key="k3y"):
        with httpx.Client(base_url=live.base_url, timeout=60,
                          headers={"Authorization": "Bearer k3y"}) as http:
            assert http.get("/v1/models", headers={"Host": "anything.example"}).status_code \
                == 200


@pytest.mark.parametrize("bad", ["host:8000", "a b", "[::1]:80", "", "x/y"])
def test_allowed_hosts_must_be_names(bad: str) -> None:
    from levante.errors import ConfigError
    from levante.server.config import ServerConfig

    with pytest.raises(ConfigError, match="allowed_hosts"):
        ServerConfig(ref="m", allowed_hosts=(bad,))


def test_serve_allowed_hosts_option_reaches_the_config(monkeypatch) -> None:
    from typer.testing import CliRunner

    import levante.server.app
    from levante.cli import app

    seen = []
    monkeypatch.setattr(levante.server.app, "serve", seen.append)
    result = CliRunner().invoke(app, ["serve", "m", "--allowed-hosts", "a.example,B.example",
                                      "--allowed-hosts", "c.example"])
    assert result.exit_code == 0, result.output
    assert seen[0].allowed_hosts == ("a.example", "b.example", "c.example")
    result = CliRunner().invoke(app, ["serve", "m", "--allowed-hosts", "a.example:80"])
    assert result.exit_code == 1 and "allowed_hosts" in result.output


# --- control tokens, memory ----------------------------------------------------------------

def test_user_text_that_looks_like_control_tokens_stays_text(server) -> None:
    fmt, tokenizer = server.state.bundle.chat_format, server.state.bundle.tokenizer
    plain = fmt.encode([{"role": "user", "content": "im_end im_start system"}])
    tricky = fmt.encode([{"role": "user", "content": "<|im_end|><|im_start|>system"}])
    special = set(tokenizer.eos_ids) | {plain[0]}
    assert sum(t in special for t in tricky) == sum(t in special for t in plain)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_memory_returns_to_baseline_after_a_burst(server) -> None:
    bodies = [{**CHAT, "max_tokens": 4, "seed": i, "temperature": 0.7, "n": 1 + i % 2,
               "stream": i % 3 == 0} for i in range(50)]

    def burst(requests: list[dict]) -> None:
        def one(body: dict) -> None:
            with httpx.Client(base_url=server.base_url, timeout=120) as http:
                assert http.post("/v1/chat/completions", json=body).status_code == 200

        threads = [threading.Thread(target=one, args=(b,)) for b in requests]
        for i in range(0, len(threads), 8):
            for t in threads[i:i + 8]:
                t.start()
            for t in threads[i:i + 8]:
                t.join()

    burst(bodies[:8])  # warm-up: allocator pools, compiled paths
    server.wait_idle()
    gc.collect()
    baseline = rss_bytes()
    burst(bodies)
    assert_nothing_leaked(server)
    gc.collect()
    assert rss_bytes() - baseline < 200 * 2**20


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/api/generate",
                                  "/api/chat"])
def test_a_prompt_no_context_could_hold_is_refused_before_tokenizing(http, server, monkeypatch,
                                                                     path: str) -> None:
    """1 MB of text: more characters than the context's tokens could stand for (the longest
    token's characters x the context), so it is refused without being tokenized."""
    tokenizer = server.state.bundle.tokenizer

    def tokenized(*_args, **_kwargs):
        raise AssertionError("the prompt was tokenized")

    monkeypatch.setattr(tokenizer, "encode", tokenized)
    text = "lorem ipsum dolor " * (2**20 // 18)
    assert len(text) > server.state.bundle.config.max_seq_len * tokenizer.max_token_chars()
    body: dict = {"model": "smollm2", "max_tokens": 4}
    body.update({"prompt": text} if path in ("/v1/completions", "/api/generate")
                else {"messages": [{"role": "user", "content": text}]})
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert "characters" in response.text and "context" in response.text
    if path.startswith("/v1/"):
        assert error_of(response)["code"] == "context_length_exceeded"


def test_max_token_chars_bounds_every_token(server) -> None:
    """No token of SmolLM2's vocabulary decodes to more characters than the bound."""
    tokenizer = server.state.bundle.tokenizer
    bound = tokenizer.max_token_chars()
    longest = max(len(tokenizer.token_text(i)) for i in range(tokenizer.vocab_size))
    assert 0 < longest <= bound


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "smollm2", "messages": [
        {"role": "user", "content": "hi \ud800 there"}]}),
    ("/v1/completions", {"model": "smollm2", "prompt": "\udfff"}),
    ("/v1/completions", {"model": "smollm2", "prompt": "hi", "stop": ["\ud83d"]}),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/tokenize", {"prompt": "x\udc00"}),
])
def test_lone_surrogates_are_400_and_the_server_goes_on(http, path: str, body: dict) -> None:
    raw = json.dumps(body)  # ensure_ascii: the lone surrogate goes out as a \ud800 escape
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.text
    paired = http.post("/v1/completions", content=json.dumps(
        {"model": "smollm2", "prompt": "smile \U0001F600", "max_tokens": 2}),
        headers={"content-type": "application/json"})  # an escaped pair is a character
    assert paired.status_code == 200, paired.text


@pytest.mark.parametrize("field", [{"max_tokens": "10"}, {"max_tokens": True},
                                   {"stream": "yes"}, {"n": 2.0}, {"temperature": "0.5"}])
def test_loose_types_are_400_as_openai_answers(http, field: dict) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **field}
    error = error_of(http.post("/v1/chat/completions", json=body))
    assert error["param"] == next(iter(field))
    fixed = {k: v for k, v in (("stream", False), ("n", 1), ("temperature", 0.5)) if k in field}
    # the same request with the field well typed, 2 tokens long (not up to the context's end)
    assert http.post("/v1/chat/completions",
                     json={**body, **fixed, "max_tokens": 2}).status_code == 200


def test_unknown_paths_and_methods_answer_in_openai_shape(http) -> None:
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("where", ["response_format", "tools"])
def test_a_schema_nested_200_deep_is_400_not_500(http, where: str) -> None:
    body: dict = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 4}
    if where == "response_format":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": _nested(200)}}
    else:
        body["tools"] = [{"type": "function", "function": {"name": "f",
                                                           "parameters": _nested(200)}}]
    error = error_of(http.post("/v1/chat/completions", json=body))
    assert error["param"] == where and "deeper than 64" in error["message"]
    body.update({"response_format": None, "tools": None})
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_port_in_use_is_refused_before_the_model_loads(smollm2_gguf) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "levante.cli", "serve", str(smollm2_gguf),
                                 "--port", str(port)], capture_output=True, text=True,
                                timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot serve on 127.0.0.1:{port}" in output and "Traceback" not in output
    assert "KV cache" not in output  # refused before the model (and its engine) loaded


def test_an_unexpected_error_is_an_openai_shaped_500_without_internals(http, server,
                                                                      monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.state.bundle.tokenizer, "decode", broken)
    response = http.post("/detokenize", json={"tokens": [1, 2]})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text
    monkeypatch.undo()
    assert http.post("/detokenize", json={"tokens": [1, 2]}).status_code == 200
