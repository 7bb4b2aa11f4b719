"""Stored Responses API responses, in memory (an LRU bounded by count and by bytes), and the
routes that read them: GET and DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel.

A stored response is its response object (the JSON it was answered with) and its input
items: the whole conversation it was generated from, a previous response's chain included,
each item with an id. `previous_response_id` continues from them. Touched from the event
loop only, so no lock.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from levante.errors import RequestError
from levante.server.http import HTTPError, error_response

log = logging.getLogger(__name__)

ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
MAX_PAGE_ITEMS = 100  # OpenAI's bounds on /input_items' `limit`, and its default
DEFAULT_PAGE_ITEMS = 20


@dataclass(frozen=True)
class StoredResponse:
    """One response as answered, the input items it came from, and what it costs to keep."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    num_bytes: int

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """What a response continuing this one starts from: its input, then its output."""
        return [*self.input_items, *self.response["output"]]


class ResponseStore:
    """The newest responses, at most `max_responses` of them and `max_bytes` (as JSON) in all;
    the least recently used go first. A response larger than the whole bound is not kept."""

    def __init__(self, max_responses: int, max_bytes: int) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        """Keep `response` under its id, evicting the oldest to fit; False if it cannot fit."""
        num_bytes = len(json.dumps(response)) + len(json.dumps(input_items))
        if self.max_responses < 1 or num_bytes > self.max_bytes:
            log.info("response %s (%d bytes) is larger than the store's bound: not stored",
                     response["id"], num_bytes)
            return False
        self.delete(response["id"])
        while self._responses and (len(self._responses) >= self.max_responses
                                   or self.num_bytes + num_bytes > self.max_bytes):
            _, evicted = self._responses.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
        self._responses[response["id"]] = StoredResponse(response, input_items, num_bytes)
        self.num_bytes += num_bytes
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response (now the most recently used), or None."""
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget a response; False if it was not stored."""
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self.num_bytes -= stored.num_bytes
        return True


def with_item_ids(items: str | list[Any]) -> list[dict[str, Any]]:
    """Request input as stored input items: a string is one user message; items without an
    id get one ("msg_", "fc_", "fco_"). Items are otherwise kept as sent, so a continuation
    builds the same chat messages the original request did."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    with_ids = []
    for item in items:
        kind = item.get("type", "message")
        prefix = ITEM_ID_PREFIXES.get(kind, "item")
        with_ids.append({"type": kind, "id": f"{prefix}_{uuid.uuid4().hex}", **item})
    return with_ids


def listed_item(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as /input_items lists it: text content as parts, with a status."""
    listed = {"status": "completed", **item}
    content = item.get("content")
    if item["type"] == "message" and isinstance(content, str):
        kind = "output_text" if item.get("role") == "assistant" else "input_text"
        listed["content"] = [{"type": kind, "text": content}]
    return listed


def register_stored_routes(app: FastAPI, store: ResponseStore) -> None:
    """Add the routes that read and forget stored responses to `app`."""

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() == "true":
            return error_response(RequestError(
                "streaming a stored response again is not supported; retrieve it whole",
                param="stream"))
        return _answer(lambda: found(store, response_id).response)

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> Response:
        def deleted() -> dict[str, Any]:
            found(store, response_id)
            store.delete(response_id)
            return {"id": response_id, "object": "response.deleted", "deleted": True}
        return _answer(deleted)

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, request: Request) -> Response:
        return _answer(lambda: item_page(found(store, response_id).input_items,
                                         dict(request.query_params)))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str) -> Response:
        def refused() -> dict[str, Any]:
            found(store, response_id)
            raise RequestError("only responses created with background=true can be "
                               "cancelled; this one has already finished",
                               param="response_id")
        return _answer(refused)


def _answer(make: Callable[[], dict[str, Any]]) -> Response:
    try:
        return JSONResponse(make())
    except (HTTPError, RequestError) as exc:
        return error_response(exc)


def found(store: ResponseStore, response_id: str) -> StoredResponse:
    """The stored response; an OpenAI-shaped 404 if it is not (or no longer) stored."""
    stored = store.get(response_id)
    if stored is None:
        raise HTTPError(404, f"response with id {response_id[:100]!r} not found (it was not "
                             "stored, was deleted, or was evicted from this server's bounded "
                             "store)", type_="invalid_request_error", param="response_id",
                        code="not_found")
    return stored


def item_page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """One page of input items: `order` asc | desc (the default, newest first), at most
    `limit` (1..100, default 20) of them, those `after` the item with that id."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise RequestError(f"order must be 'asc' or 'desc', got {order[:20]!r}", param="order")
    limit = query.get("limit", str(DEFAULT_PAGE_ITEMS))
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= MAX_PAGE_ITEMS:
        raise RequestError(f"limit must be an integer from 1 to {MAX_PAGE_ITEMS}, got "
                           f"{limit[:20]!r}", param="limit")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if "after" in query:
        ids = [item["id"] for item in ordered]
        if query["after"] not in ids:
            raise RequestError(f"after: no input item {query['after'][:100]!r} in this "
                               "response", param="after")
        start = ids.index(query["after"]) + 1
    page = [listed_item(item) for item in ordered[start:start + int(limit)]]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + int(limit) < len(ordered)}
