"""Stored responses: the bounded LRU and input-item pages."""

from __future__ import annotations

import json

import pytest

from levante.errors import RequestError
from levante.server.response_store import ResponseStore, item_page, with_item_ids


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
