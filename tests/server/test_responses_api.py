"""POST /v1/responses with the official openai client: whole, streamed, JSON, tool loops, errors."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import fail_model_step, start_server

QUESTION = "What is the capital of France? Answer in one word."
MESSAGES = [{"role": "user", "content": QUESTION}]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
CITY_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
               "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def chat_text(client, messages, max_tokens: int) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="smollm2", messages=messages,
                                          max_tokens=max_tokens, temperature=0)


def _chat_turns(call, output: str, **assistant) -> list[dict]:
    """The chat messages a Responses function call and its output stand for."""
    return [{"role": "assistant", **assistant, "tool_calls": [
        {"id": call.call_id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": output}]


def _nested(tools: list[dict]) -> list[dict]:
    """Flat Responses tools in chat's nested shape."""
    return [{"type": "function", "function": {
        k: tool[k] for k in ("name", "description", "parameters")}} for tool in tools]


def test_response_equals_chat_completion(client) -> None:
    r = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=20,
                                temperature=0, metadata={"run": "1"}, user="u1", store=True)
    chat = chat_text(client, MESSAGES, 20)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and "Paris" in r.output_text
    [item] = r.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                        else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.model, r.metadata, r.user, r.temperature) == ("smollm2", {"run": "1"}, "u1", 0)
    assert r.max_output_tokens == 20 and r.text.format.type == "text" and r.tools == []


def test_input_items_and_instructions_are_the_chat_messages(client, server) -> None:
    """instructions -> a system message; items with text parts -> the same prompt as chat's."""
    items = [{"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Name a color."}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
             {"role": "user", "content": "Another one?"}]
    r = client.responses.create(model="smollm2", input=items, instructions="Be brief.",
                                max_output_tokens=8, temperature=0)
    chat_messages = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
                     {"role": "user", "content": "Another one?"}]
    prompt = server.state.chats.prepare(chat_messages).prompt_ids
    assert r.usage.input_tokens == len(prompt)
    assert r.output_text == chat_text(client, chat_messages, 8).choices[0].message.content
    assert r.instructions == "Be brief."


def test_stream_events_in_order_and_equal_to_whole(client) -> None:
    whole = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=20,
                                    temperature=0)
    events = list(client.responses.create(model="smollm2", input=QUESTION,
                                          max_output_tokens=20, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", final]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    last = events[-1].response
    assert last.output_text == text and last.usage.output_tokens == whole.usage.output_tokens
    assert last.output[0].id == events[2].item.id == events[-2].item.id


def test_stream_is_sse_with_event_lines(server) -> None:
    body = {"model": "smollm2", "input": QUESTION, "max_output_tokens": 4, "stream": True}
    with (httpx.Client(base_url=server.base_url, timeout=60) as http,
          http.stream("POST", "/v1/responses", json=body) as r):
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert all(line.startswith("event: ") for line in lines[::2])
    assert names == [d["type"] for d in datas] and "[DONE]" not in lines[-1]


def test_max_output_tokens_makes_it_incomplete(client) -> None:
    r = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=2,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model="smollm2", input=QUESTION,
                                          max_output_tokens=2, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == r.output_text


def test_json_schema_format_gives_valid_json(client) -> None:
    r = client.responses.create(
        model="smollm2", input="Describe Paris as JSON.", max_output_tokens=80, temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA,
                         "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), CITY_SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"


def test_json_object_format(client) -> None:
    r = client.responses.create(model="smollm2", input="Give a JSON object about Paris.",
                                max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_object"}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:  # cut by the limit: still the start of an object
        assert r.output_text.lstrip().startswith("{")


def test_function_call_loop(client, server) -> None:
    """A forced call is valid by construction; its output reaches the next prompt."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(
        model="smollm2", input=ask, tools=[WEATHER], max_output_tokens=40, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.status == "completed" and first.tool_choice.name == "get_weather"
    assert first.parallel_tool_calls is False
    assert first.tools[0].name == "get_weather"
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": "22 degrees and sunny"}
    second = client.responses.create(model="smollm2", input=[*ask, *first.output, result],
                                     tools=[WEATHER], max_output_tokens=16, temperature=0)
    history = [*ask, *_chat_turns(call, "22 degrees and sunny", content=None)]
    prompt = server.state.chats.prepare(history, tools=_nested([WEATHER])).prompt_ids
    assert second.usage.input_tokens == len(prompt) > first.usage.input_tokens
    assert "22 degrees and sunny" in server.state.bundle.tokenizer.decode(prompt)


def test_streamed_function_call(client) -> None:
    events = list(client.responses.create(
        model="smollm2", input="Weather in Rome?", tools=[WEATHER], max_output_tokens=40,
        temperature=0, tool_choice="required", parallel_tool_calls=False, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    pieces = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    assert pieces == events[-3].arguments == events[-1].response.output[0].arguments
    jsonschema.validate(json.loads(pieces), WEATHER["parameters"])
    assert events[-2].item.call_id == events[2].item.call_id


BAD_BODIES = [
    ({"tools": [{"type": "web_search"}]}, "tools", "function tools only"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools", "not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "input_image"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
     "input", "call_9"),
    ({"input": []}, "input", "empty"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "xml"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}}, "text.format",
     "schema"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "tool_choice"),
    ({"temperature": "hot"}, "temperature", "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"background": True}, "background", "not supported"),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD_BODIES)
def test_bad_requests_are_openai_400s(server, extra, param, words) -> None:
    body = {"model": "smollm2", "input": "Hi", "max_output_tokens": 2, **extra}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert words in error["message"]
        ok = http.post("/v1/responses", json={"model": "smollm2", "input": "Hi",
                                              "max_output_tokens": 2})
        assert ok.status_code == 200 and ok.json()["status"] == "incomplete"


def test_client_raises_on_400_and_unknown_model(client) -> None:
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.create(model="smollm2", input="Hi", background=True)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="Hi")


def test_unknown_response_ids_are_openai_404s(client, server) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.retrieve("resp_abc")
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(model="smollm2", input="Hi", previous_response_id="resp_x")
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        for method, path in [("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")]:
            r = http.request(method, "/v1/responses/resp_abc" + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = http.post("/v1/responses", json={"model": "smollm2", "input": "Hi",
                                             "previous_response_id": "resp_x"})
    error = r.json()["error"]
    assert error["param"] == "previous_response_id"
    assert error["code"] == "previous_response_not_found"


def test_reasoning_is_accepted_and_echoed(client) -> None:
    r = client.responses.create(model="smollm2", input="Hi", max_output_tokens=2,
                                temperature=0, reasoning={"effort": "low"})
    assert r.reasoning.effort == "low" and r.usage.output_tokens_details.reasoning_tokens == 0


def test_error_mid_stream_is_a_failed_event(server, monkeypatch) -> None:
    fail_model_step(server, monkeypatch, on_call=3, message="fault mid-stream")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    events = list(client.responses.create(model="smollm2", input=QUESTION, stream=True,
                                          max_output_tokens=20))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert "fault mid-stream" in events[-1].response.error.message
    server.wait_idle()


def test_sdk_stream_helper_accumulates_the_same_response(client) -> None:
    """`client.responses.stream` rebuilds the response from the events (indexes and all)."""
    whole = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=12,
                                    temperature=0)
    with client.responses.stream(model="smollm2", input=QUESTION, max_output_tokens=12,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text


def test_sdk_parse_fills_a_pydantic_model(client) -> None:
    """`client.responses.parse(text_format=Model)` sends a strict json_schema format."""
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=20)
        population: int = Field(ge=0, le=10**9)

    r = client.responses.parse(model="smollm2", input="Describe Paris as JSON.",
                               text_format=City, max_output_tokens=80, temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, City)
    assert r.output_parsed == City.model_validate_json(r.output_text)


@pytest.fixture(scope="module")
def mistral_server(tiny_mistral_hf):
    """A random model with Mistral's V7 format: calls are [TOOL_CALLS] + JSON."""
    from levante.bundle import load

    yield from start_server("tiny-mistral", load(str(tiny_mistral_hf), max_seq_len=1024),
                            max_num_seqs=4)


def test_mistral_v7_function_call_loop(mistral_server) -> None:
    """On the V7 format a forced call streams as function-call events and its output comes
    back to the prompt in [TOOL_RESULTS] (a random model: the grammar makes the call valid)."""
    client = openai.OpenAI(base_url=mistral_server.base_url + "/v1", api_key="none",
                           max_retries=0)
    tool = {**WEATHER, "parameters": {"type": "object", "required": ["city"],
                                      "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                      "additionalProperties": False}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="tiny-mistral", tools=[tool], max_output_tokens=60, temperature=0,
              parallel_tool_calls=False)
    events = list(client.responses.create(input=ask, stream=True, **kw,
                                          tool_choice={"type": "function",
                                                       "name": "get_weather"}))
    final = events[-1].response
    assert events[-1].type == "response.completed", [e.type for e in events]
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    pieces = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    assert pieces == call.arguments
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": "22 degrees and sunny"}
    second = client.responses.create(input=[*ask, *final.output, result], **kw)
    bundle = mistral_server.state.bundle
    history = [*ask, *_chat_turns(call, "22 degrees and sunny")]
    prompt = mistral_server.state.chats.prepare(history, tools=_nested([tool])).prompt_ids
    assert second.usage.input_tokens == len(prompt)
    text = bundle.tokenizer.decode(prompt)
    assert "22 degrees and sunny" in text


def test_a_call_cut_off_by_the_limit_is_incomplete(client) -> None:
    """Streamed, the call was announced before it was cut: it ends "incomplete", and its text
    follows as the message the whole response holds."""
    kw = dict(model="smollm2", input="Weather in Rome?", tools=[WEATHER], temperature=0,
              max_output_tokens=20, tool_choice="required")
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    assert whole.status == "incomplete" and events[-1].type == "response.incomplete"
    [call] = [e.item for e in events if e.type == "response.output_item.done"
              and e.item.type == "function_call"]
    assert call.status == "incomplete"
    assert [item.type for item in whole.output] == ["message"]
    assert events[-1].response.output_text == whole.output_text
