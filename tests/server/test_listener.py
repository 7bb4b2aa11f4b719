"""The listener: the drain deadline, read timeouts against slowloris, the connection bound."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server

LONG = {"model": "smollm2", "prompt": "Count:", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture
def guarded(smollm2_bundle) -> Iterator[LiveServer]:
    yield from start_server("smollm2", smollm2_bundle, header_timeout=0.5, body_timeout=0.5,
                            max_connections=4, no_web=True)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (recv returns b"") within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_drain_deadline_ends_streams_with_an_error_event_and_plain_requests_with_503(
        smollm2_bundle) -> None:
    for live in start_server("smollm2", smollm2_bundle, drain_timeout=1.0, no_web=True):
        with httpx.Client(base_url=live.base_url, timeout=60) as http, \
                httpx.Client(base_url=live.base_url, timeout=60) as other:
            with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                live.server.handle_exit(signal.SIGTERM, None)
                refused = other.post("/v1/completions", json=LONG)
                events = [line for line in lines if line.startswith("data: ")]
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutdown"
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "server_shutdown" and "drain" in error["message"]
        deadline = time.monotonic() + 15
        while not live.server.started or not live.server.should_exit:
            assert time.monotonic() < deadline, "the server did not stop after the drain"
            time.sleep(0.1)
        assert live.state.engine.num_active == 0


def test_drain_deadline_gives_a_plain_request_in_flight_a_503(smollm2_bundle) -> None:
    answers: list[httpx.Response] = []

    def ask(http: httpx.Client) -> None:
        answers.append(http.post("/v1/completions", json=LONG))

    for live in start_server("smollm2", smollm2_bundle, drain_timeout=1.0, no_web=True):
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            worker = threading.Thread(target=ask, args=(http,))
            worker.start()
            deadline = time.monotonic() + 30
            while live.state.engine.num_active == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            live.server.handle_exit(signal.SIGTERM, None)
            worker.join(30)
        (answer,) = answers
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "server_shutdown"


def test_headers_that_never_finish_are_cut_off_and_others_are_served(guarded) -> None:
    port = int(guarded.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as silent, \
            socket.create_connection(("127.0.0.1", port)) as trickle:
        trickle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _closed_within(silent, 5) and _closed_within(trickle, 5)
    assert httpx.get(guarded.base_url + "/health").status_code == 200


def test_a_body_that_never_finishes_is_cut_off(guarded) -> None:
    port = int(guarded.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod")
        assert _closed_within(slow, 5)
    with httpx.Client(base_url=guarded.base_url, timeout=60) as http:
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
        # a keep-alive connection gets a fresh header deadline after each response
        time.sleep(1.0)
        assert http.get("/health").status_code == 200


def test_connections_past_the_bound_get_an_openai_shaped_503(guarded) -> None:
    port = int(guarded.base_url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        refused = httpx.get(guarded.base_url + "/health")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(guarded.base_url + "/health").status_code == 200
