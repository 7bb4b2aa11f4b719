"""Schemathesis against our own /openapi.json: no 5xx, every error in OpenAI's (or Ollama's)
shape, and the server still serves and holds no KV block afterwards.

Bounded for the suite (a case budget and a time budget per operation); `benchmarks/fuzz_api.py`
runs the same test longer by raising LEVANTE_FUZZ_EXAMPLES and LEVANTE_FUZZ_SECONDS.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

MAX_EXAMPLES = int(os.environ.get("LEVANTE_FUZZ_EXAMPLES", "30"))
SECONDS_PER_OPERATION = float(os.environ.get("LEVANTE_FUZZ_SECONDS", "5"))
IS_RANDOM = os.environ.get("LEVANTE_FUZZ_RANDOM") == "1"  # the suite replays the same cases
# Output tokens a generated request may ask for: the schema allows up to the context (2048),
# which on 2 CPU cores is ~a minute per case. Larger values are kept: they must be a 400.
MAX_FUZZ_TOKENS = 8
CONTEXT = 2048

# Every operation but POST /api/pull (it would download a model). Listed here, not read from
# the schema, so pytest can name each; a test checks the list against the live schema.
OPERATIONS = ("GET /health", "GET /v1/models", "GET /metrics", "POST /v1/chat/completions",
              "POST /v1/completions", "HEAD /", "GET /api/version", "GET /api/tags",
              "GET /api/ps", "POST /api/show", "POST /api/chat", "POST /api/generate",
              "POST /tokenize", "POST /detokenize", "POST /v1/embeddings", "POST /api/embed",
              "POST /api/embeddings", "POST /api/create", "POST /api/copy", "DELETE /api/delete",
              "POST /v1/responses", "GET /v1/responses/{response_id}",
              "DELETE /v1/responses/{response_id}", "GET /v1/responses/{response_id}/input_items",
              "POST /v1/responses/{response_id}/cancel")
cases: Counter[str] = Counter()
statuses: Counter[int] = Counter()
ROLES = ("system", "user", "assistant", "tool", "developer", "wizard")
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                              "text": st.text(max_size=20)})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES)},
    optional={"content": st.one_of(st.text(max_size=60), st.none(), st.lists(PART, max_size=2)),
              "name": st.text(max_size=8), "tool_call_id": st.text(max_size=12)})
# An empty list means: keep what schemathesis generated.
MESSAGES = st.lists(MESSAGE, max_size=4)


@pytest.fixture(scope="module")
def api_schema(server):
    """Our OpenAPI document as the live server serves it."""
    yield schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    print(f"\nschemathesis: {sum(cases.values())} cases: {dict(sorted(cases.items()))}; "
          f"statuses {dict(sorted(statuses.items()))}")


def test_the_operation_list_is_the_schema(api_schema) -> None:
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    assert labels == {*OPERATIONS, "POST /api/pull"}


def test_every_request_body_is_in_the_schema(server) -> None:
    document = httpx.get(server.base_url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat",
                 "/api/generate", "/v1/embeddings", "/api/embed", "/api/embeddings",
                 "/api/create", "/api/delete"):
        (operation,) = document["paths"][path].values()
        ref = operation["requestBody"]["content"]["application/json"]
        name = ref["schema"]["$ref"].rsplit("/", 1)[-1]
        assert "model" in document["components"]["schemas"][name]["properties"]


def reach_the_engine(body: Any, *, is_served_model: bool,
                     messages: list[dict[str, Any]]) -> None:
    """Mostly name the served model, and send messages shaped like chat messages: a random
    `model` is a 404 and a random message a 400, which would stop nearly every case early."""
    if not isinstance(body, dict):
        return
    if is_served_model and isinstance(body.get("model"), str):
        body["model"] = "smollm2"
    for name in ("messages", "input"):  # chat's messages; the Responses API's input items
        if isinstance(body.get(name), list) and messages:
            body[name] = messages


def bound_generation(path: str, body: Any) -> None:
    """Cap how many tokens a generated body asks for (see MAX_FUZZ_TOKENS)."""
    if not isinstance(body, dict):
        return
    if path.startswith("/api/"):
        if body.get("options") is None:
            body["options"] = {}
        options = body["options"]
        predict = options.get("num_predict") if isinstance(options, dict) else 0
        if predict is None or type(predict) is int and (predict in (-1, -2)
                                                        or MAX_FUZZ_TOKENS < predict <= CONTEXT):
            options["num_predict"] = MAX_FUZZ_TOKENS  # -1 and -2 mean "fill the context"
        return
    names = ("max_output_tokens",) if path == "/v1/responses" else ("max_tokens",
                                                                    "max_completion_tokens")
    for name in names:
        value = body.get(name)
        if type(value) is int and MAX_FUZZ_TOKENS < value <= CONTEXT:
            body[name] = value % MAX_FUZZ_TOKENS + 1
    if all(body.get(name) is None for name in names):
        body[names[0]] = MAX_FUZZ_TOKENS


def check_error_shape(path: str, response: Any) -> None:
    """An error body is OpenAI's {"error": {message, type, param, code}}; Ollama's on /api/*."""
    error = response.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and error, response.text
    else:
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_5xx_and_errors_are_shaped(label: str, api_schema, server) -> None:
    """Valid and invalid bodies/parameters alike: never a 5xx, errors in the right shape."""
    operation = api_schema.find_operation_by_label(label)
    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    deadline = time.monotonic() + SECONDS_PER_OPERATION

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=not IS_RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy, st.sampled_from([True, True, True, False]), MESSAGES)
    def run(case, is_served_model: bool, messages: list[dict[str, Any]]) -> None:
        if time.monotonic() > deadline:
            return  # this operation's time budget is spent
        cases[label] += 1
        reach_the_engine(case.body, is_served_model=is_served_model, messages=messages)
        bound_generation(case.path, case.body)
        response = case.call(base_url=server.base_url, timeout=60)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (label, case.body, response.text[:500])
        if response.status_code >= 400:
            check_error_shape(case.path, response)

    run()


def test_still_serving_and_nothing_leaked_after_fuzzing(server) -> None:
    server.wait_idle(timeout=30)
    assert server.engine.pool.num_free == server.engine.pool.num_blocks
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
