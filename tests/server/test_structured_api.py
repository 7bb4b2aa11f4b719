"""response_format and tools through the openai client: valid by construction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.server.conftest import LiveServer, start_server

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+$",
                                           "maxLength": 12}}}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def _check_calls(calls, tools=(WEATHER, TIME)) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_json_schema_output_validates(server) -> None:
    for seed in range(3):
        r = _client(server).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Describe a person."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON}},
            temperature=1.0, seed=seed, max_tokens=80)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_mode(server) -> None:
    r = _client(server).chat.completions.create(
        model="smollm2", messages=ASK, response_format={"type": "json_object"},
        max_tokens=60, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut off: never claims to be complete
        assert r.choices[0].finish_reason == "length"


def test_invalid_schema_is_400(server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                     "minimum": "zero"}}})
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=5, tools=[{"type": "function"}])
    assert info.value.body["param"] == "tools"


def test_required_tool_calls_validate(server) -> None:
    for seed in range(4):
        r = _client(server).chat.completions.create(
            model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=80)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls)


def test_named_tool_choice_and_streaming_deltas(server) -> None:
    kwargs = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_time"}},
                  temperature=0, max_tokens=60)
    whole = _client(server).chat.completions.create(**kwargs)
    _check_calls(whole.choices[0].message.tool_calls)
    assert {c.function.name for c in whole.choices[0].message.tool_calls} == {"get_time"}
    with _client(server).chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert [c.function.arguments for c in streamed] == \
        [c.function.arguments for c in whole.choices[0].message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.fixture(scope="module")
def mistral_server(tiny_mistral_hf: Path) -> Iterator[LiveServer]:
    from levante.bundle import load

    bundle = load(str(tiny_mistral_hf), max_seq_len=1024)
    yield from start_server("tiny-mistral", bundle, max_num_seqs=4)


def test_mistral_v7_tool_calls_on_a_random_model(mistral_server) -> None:
    """A random model can only produce valid calls if the grammar makes them so."""
    client = _client(mistral_server)
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny-mistral", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=120)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        _check_calls(r.choices[0].message.tool_calls)
        for call in r.choices[0].message.tool_calls:
            assert len(call.id) == 9 and call.id.isalnum()
    history = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "call_abc123def456", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc123def456", "content": "22C, sunny"}]
    r = client.chat.completions.create(model="tiny-mistral", messages=history,
                                       tools=[WEATHER], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(
        model="tiny-mistral", messages=ASK, max_tokens=60, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_the_server_builds_the_grammar_compiler_before_the_first_request(smollm2_bundle) -> None:
    """llguidance's tokenizer holds the GIL while it is built (~0.2 s): a first structured
    request used to build it, stalling every connection meanwhile."""
    import time

    for live in start_server("smollm2", smollm2_bundle):
        deadline = time.monotonic() + 30
        while live.state.chats._compiler is None:  # built in the background at start
            assert time.monotonic() < deadline, "no grammar compiler 30 s after start"
            time.sleep(0.05)
        assert live.state.bundle.tokenizer._plain is not None  # user text's tokenizer too
