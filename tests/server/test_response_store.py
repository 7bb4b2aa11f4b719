"""Stored responses: the bounded LRU, input-item pages, and with the openai client
previous_response_id, retrieve, delete, input_items, cancel and eviction on a live server."""

from __future__ import annotations

import json

import openai
import pytest

from levante.errors import RequestError
from levante.server.response_store import ResponseStore, item_page, with_item_ids
from tests.server.conftest import fail_model_step, start_server
from tests.server.test_responses_api import WEATHER


def fake(response_id: str, text: str = "") -> dict:
    return {"id": response_id, "object": "response", "output": [{"text": text}]}


def test_the_store_evicts_the_least_recently_used_by_count() -> None:
    store = ResponseStore(max_responses=2, max_bytes=10**6)
    assert store.put(fake("a"), []) and store.put(fake("b"), [])
    assert store.get("a") is not None  # now b is the least recently used
    store.put(fake("c"), [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2 and store.delete("c") and not store.delete("c")


def test_the_store_evicts_by_bytes_and_refuses_what_cannot_fit() -> None:
    size = len(json.dumps(fake("a", "x" * 100))) + len(json.dumps([]))
    store = ResponseStore(max_responses=100, max_bytes=2 * size + 10)
    for name in "abc":
        assert store.put(fake(name, "x" * 100), [])
    assert store.get("a") is None and store.num_bytes == 2 * size
    assert not store.put(fake("big", "x" * 1000), []) and store.get("big") is None
    assert store.get("b") is not None and store.get("c") is not None
    store.delete("b")
    assert store.num_bytes == size
    assert not ResponseStore(max_responses=0, max_bytes=10**6).put(fake("a"), [])


def test_item_pages_order_limit_after() -> None:
    items = with_item_ids([{"role": "user", "content": str(i)} for i in range(5)])
    ids = [item["id"] for item in items]
    page = item_page(items, {})
    assert [i["id"] for i in page["data"]] == ids[::-1] and page["has_more"] is False
    assert page["data"][0]["content"] == [{"type": "input_text", "text": "4"}]
    assert page["data"][0]["status"] == "completed" and page["data"][0]["type"] == "message"
    page = item_page(items, {"order": "asc", "limit": "2", "after": ids[1]})
    assert [i["id"] for i in page["data"]] == ids[2:4] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (ids[2], ids[3])
    assert item_page(items, {"order": "asc", "after": ids[4]})["data"] == []
    for query, param in [({"order": "up"}, "order"), ({"limit": "0"}, "limit"),
                         ({"limit": "101"}, "limit"), ({"after": "msg_x"}, "after")]:
        with pytest.raises(RequestError) as info:
            item_page(items, query)
        assert info.value.param == param


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


GREEDY = dict(model="smollm2", temperature=0, max_output_tokens=12)


def test_retrieve_returns_the_response_as_created(client) -> None:
    r = client.responses.create(input="Name a fruit.", store=True, metadata={"k": "v"},
                                **GREEDY)
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
    default = client.responses.create(input="Name a fruit.", **GREEDY)  # store defaults on
    assert client.responses.retrieve(default.id).output_text == default.output_text


def test_previous_response_id_equals_sending_the_history(client) -> None:
    """Same prompt (input_tokens) and same greedy output as the whole conversation by hand;
    the first turn's instructions are not carried over."""
    first = client.responses.create(input="Name a color.", instructions="Be brief.",
                                    **GREEDY)
    second = client.responses.create(input="Another one?", previous_response_id=first.id,
                                     **GREEDY)
    by_hand = client.responses.create(input=[
        {"role": "user", "content": "Name a color."}, *first.output,
        {"role": "user", "content": "Another one?"}], store=False, **GREEDY)
    assert second.usage.input_tokens == by_hand.usage.input_tokens
    assert second.output_text == by_hand.output_text
    assert second.previous_response_id == first.id and second.instructions is None
    third = client.responses.create(input="And a third?", previous_response_id=second.id,
                                    instructions="Answer in French.", **GREEDY)
    by_hand = client.responses.create(instructions="Answer in French.", input=[
        {"role": "user", "content": "Name a color."}, *first.output,
        {"role": "user", "content": "Another one?"}, *second.output,
        {"role": "user", "content": "And a third?"}], store=False, **GREEDY)
    assert third.usage.input_tokens == by_hand.usage.input_tokens
    assert third.output_text == by_hand.output_text


def test_function_call_loop_without_resending_history(client, server) -> None:
    ask = "What is the weather in Paris?"
    first = client.responses.create(
        model="smollm2", input=ask, tools=[WEATHER], max_output_tokens=40, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    [call] = first.output
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": "22 degrees and sunny"}
    second = client.responses.create(model="smollm2", input=[result], tools=[WEATHER],
                                     previous_response_id=first.id, max_output_tokens=16,
                                     temperature=0)
    history = [{"role": "user", "content": ask}, {"role": "assistant", "content": None,
                                                  "tool_calls": [{
        "id": call.call_id, "type": "function",
        "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "22 degrees and sunny"}]
    nested = [{"type": "function", "function": {
        k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    prompt = server.state.chats.prepare(history, tools=nested).prompt_ids
    assert second.usage.input_tokens == len(prompt)
    items = list(client.responses.input_items.list(second.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == call.id and items[2].call_id == call.call_id


def test_input_items_pages_through_the_whole_conversation(client) -> None:
    first = client.responses.create(input="Name a color.", **GREEDY)
    second = client.responses.create(input=[{"role": "user", "content": "Another?"}],
                                     previous_response_id=first.id, **GREEDY)
    page = client.responses.input_items.list(second.id)
    assert [i.type for i in page.data] == ["message"] * 3 and page.has_more is False
    newest = page.data[0]
    assert newest.role == "user" and newest.content[0].text == "Another?"
    assert page.data[1].id == first.output[0].id and page.data[2].content[0].text == (
        "Name a color.")
    one = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert [i.id for i in one.data] == [page.data[2].id] and one.has_more is True
    every = [i.id for i in client.responses.input_items.list(second.id, order="asc",
                                                              limit=1)]
    assert every == [i.id for i in page.data[::-1]]  # the SDK followed `after` page by page


def test_delete_then_retrieve_is_not_found(client) -> None:
    r = client.responses.create(input="Hi", **GREEDY)
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(input="Again", previous_response_id=r.id, **GREEDY)


def test_delete_answers_a_deleted_object(server, client) -> None:
    import httpx

    r = client.responses.create(input="Hi", **GREEDY)
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        assert http.delete(f"/v1/responses/{r.id}").json() == {
            "id": r.id, "object": "response.deleted", "deleted": True}


def test_store_false_is_neither_retrievable_nor_continued(client) -> None:
    r = client.responses.create(input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(input="Again", previous_response_id=r.id, **GREEDY)


def test_a_stream_is_stored_when_it_ends(client) -> None:
    events = list(client.responses.create(input="Name a fruit.", stream=True, **GREEDY))
    final = events[-1].response
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    follow = client.responses.create(input="Another?", previous_response_id=final.id,
                                     **GREEDY)
    assert follow.usage.input_tokens > final.usage.input_tokens + final.usage.output_tokens


def test_a_failed_stream_is_stored_failed(server, client, monkeypatch) -> None:
    fail_model_step(server, monkeypatch, on_call=3, message="fault mid-stream")
    events = list(client.responses.create(input="Name a fruit.", stream=True, **GREEDY))
    server.wait_idle()
    stored = client.responses.retrieve(events[-1].response.id)
    assert stored.status == "failed" and "fault mid-stream" in stored.error.message


def test_cancel_is_refused_for_a_finished_response(client) -> None:
    r = client.responses.create(input="Hi", **GREEDY)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(r.id)
    assert client.responses.retrieve(r.id).status == r.status


@pytest.fixture(scope="module")
def small_store_server(smollm2_bundle):
    yield from start_server("smollm2", smollm2_bundle, max_num_seqs=2,
                            max_stored_responses=2)


def test_the_bound_evicts_the_least_recently_used(small_store_server) -> None:
    client = openai.OpenAI(base_url=small_store_server.base_url + "/v1", api_key="none",
                           max_retries=0)
    a, b = (client.responses.create(input=text, **GREEDY) for text in ("One", "Two"))
    client.responses.retrieve(a.id)  # a is now more recent than b
    c = client.responses.create(input="Three", **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(b.id)
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(input="More", previous_response_id=b.id, **GREEDY)
    assert client.responses.retrieve(a.id).id == a.id
    assert client.responses.retrieve(c.id).id == c.id
