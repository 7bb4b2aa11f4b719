"""OpenAI's Responses API, /v1/responses, on the chat path: response objects, typed SSE.

Responses with `store` (OpenAI's default) are kept in memory, within the server's bounds (see
server.response_store): `previous_response_id` continues one, GET /v1/responses/{id} returns
it as it was answered (a streamed one once its stream has ended, failed or incomplete ones
with their status), DELETE forgets it, GET .../input_items pages through its conversation.

A streamed response is `event: <type>` / `data: <json>` pairs, numbered by `sequence_number`:
response.created, response.in_progress, then per output item output_item.added, for a
message content_part.added, output_text.delta..., output_text.done, content_part.done, for a
function call function_call_arguments.delta..., function_call_arguments.done, then
output_item.done; last response.completed (or response.incomplete when max_output_tokens
cut it, response.failed when generation failed). No `data: [DONE]`, as OpenAI's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from levante.chat.tool_calls import ChatDelta
from levante.errors import RequestError
from levante.kinds import FinishReason
from levante.server.config import ServerConfig
from levante.server.http import HTTPError, error_response, parse_body
from levante.server.response_store import ResponseStore, register_stored_routes, with_item_ids
from levante.server.responses import Choice, Generation
from levante.server.responses_protocol import ResponsesRequest
from levante.server.routes import ServerState

# The chat path's names for what a Responses request calls otherwise (errors name the field).
RENAMED_PARAMS = {"messages": "input", "response_format": "text.format"}


def register_responses(app: FastAPI, config: ServerConfig, state: ServerState) -> None:
    """Add POST /v1/responses to `app`; the stored-response routes share its store."""
    limit = config.max_body_bytes
    store = ResponseStore(config.max_stored_responses, config.max_stored_response_bytes)

    @app.post("/v1/responses")
    async def create(request: Request) -> Response:
        try:
            response = await _create(request, state, store, limit)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            if isinstance(exc, RequestError) and exc.param in RENAMED_PARAMS:
                exc.param = RENAMED_PARAMS[exc.param]
            response = error_response(exc)
        state.metrics.requests.labels("responses", str(response.status_code)).inc()
        return response

    register_stored_routes(app, store)


async def _create(request: Request, state: ServerState, store: ResponseStore,
                  limit: int) -> Response:
    body: ResponsesRequest = await parse_body(request, ResponsesRequest, limit)
    body.check_supported()
    adapter_id = state.check_model(body.model)
    history = [] if body.previous_response_id is None else previous_conversation(
        store, body.previous_response_id)
    chat = body.to_chat(history)
    input_items = [*history, *with_item_ids(body.input)]
    params = body.params()
    prepared = await asyncio.to_thread(
        state.chats.prepare, chat.messages, tools=chat.tools, tool_choice=chat.tool_choice,
        response_format=chat.response_format, parallel_tool_calls=body.parallel_tool_calls)
    state.check_admissible([prepared.prompt_ids], params, num_new=1)
    generation = Generation(state.engine, state.metrics, state.bundle.tokenizer,
                            [(0, prepared.prompt_ids, params)], n=1, chat=True,
                            model=body.model, adapter_id=adapter_id, grammar=prepared.grammar,
                            tool_style=prepared.tool_style)
    shell = Shell("resp_" + uuid.uuid4().hex, int(time.time()), body,
                  store if body.store else None, input_items)
    await generation.start()
    if body.stream:
        return StreamingResponse(_stream(generation, shell), media_type="text/event-stream")
    await generation.collect(request)
    choice = generation.choices[0]
    status = response_status(choice.finish_reason)
    return JSONResponse(shell.keep(shell.render(status, output=output_items(choice, status),
                                                usage=responses_usage(generation.usage()))))


def previous_conversation(store: ResponseStore, response_id: str) -> list[dict[str, Any]]:
    """The items a response continuing `response_id` starts from; a 404 if it is not stored."""
    stored = store.get(response_id)
    if stored is None:
        raise HTTPError(404, f"previous response with id {response_id[:100]!r} not found (it "
                             "was not stored, was deleted, or was evicted from this server's "
                             "bounded store)", type_="invalid_request_error",
                        param="previous_response_id", code="previous_response_not_found")
    return stored.conversation


@dataclass(frozen=True)
class Shell:
    """What each rendering of one response repeats: its id, creation time, the request; and
    where its final rendering is kept (no store: not kept) with the input items it came from."""

    id: str
    created_at: int
    body: ResponsesRequest
    store: ResponseStore | None
    input_items: list[dict[str, Any]]

    def keep(self, response: dict[str, Any]) -> dict[str, Any]:
        """Store the final rendering (when the request asked to) and return it."""
        if self.store is not None:
            self.store.put(response, self.input_items)
        return response

    def render(self, status: str, *, output: list[dict[str, Any]] | None = None,
               usage: dict[str, Any] | None = None,
               error: dict[str, str] | None = None) -> dict[str, Any]:
        """The `response` object, echoing the parameters it ran with as OpenAI's does."""
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": error, "incomplete_details": incomplete,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "model": body.model, "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "reasoning": body.reasoning,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": body.text_format()}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled", "usage": usage, "user": body.user}


def response_status(finish_reason: FinishReason | None) -> str:
    """completed; incomplete when the token limit cut the output; cancelled when aborted."""
    if finish_reason == FinishReason.LENGTH:
        return "incomplete"
    return "cancelled" if finish_reason == FinishReason.ABORT else "completed"


def responses_usage(usage: dict[str, int]) -> dict[str, Any]:
    """Chat usage in the Responses shape (no prefix-cache count is kept per request: 0)."""
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant `message` output item with one output_text part."""
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [text_part(text)]}


def text_part(text: str) -> dict[str, Any]:
    """An `output_text` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str) -> dict[str, Any]:
    """A `function_call` output item."""
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def new_item_id(prefix: str) -> str:
    """A fresh output item id: "msg_..." or "fc_..."."""
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(choice: Choice, status: str) -> list[dict[str, Any]]:
    """A finished choice's output: its text as a message (also when empty, unless it only
    calls tools), then its calls; the same items a stream of it builds."""
    items = []
    if choice.text or not choice.tool_calls:
        items.append(message_item(new_item_id("msg"), choice.text, status))
    for call in choice.tool_calls:
        function = call["function"]
        items.append(call_item(new_item_id("fc"), "call_" + call["id"], function["name"],
                               function["arguments"], "completed"))
    return items


async def _stream(generation: Generation, shell: Shell) -> AsyncIterator[str]:
    writer = EventWriter(shell, generation.choices[0])
    yield writer.event("response.created", response=shell.render("in_progress"))
    yield writer.event("response.in_progress", response=shell.render("in_progress"))
    try:
        async for _, delta, out in generation.deltas():
            if out.error:
                yield writer.failed(out.error)
                return
            for text in writer.add(delta):
                yield text
        status = response_status(generation.choices[0].finish_reason)
        for text in writer.finish(status, responses_usage(generation.usage())):
            yield text
    finally:
        generation.abort()


class EventWriter:
    """The typed SSE events of one streamed response, numbered in order, and the output
    items they have completed. One item is open at a time: text after a call, or a call
    after text, closes the one before. A call whose arguments were cut off ends "incomplete"
    (its text then follows as a message, as the whole response has it)."""

    def __init__(self, shell: Shell, choice: Choice) -> None:
        self.shell = shell
        self.choice = choice
        self.num_events = 0
        self.output: list[dict[str, Any]] = []
        self._item: dict[str, Any] | None = None  # the open item (as output_item.added)
        self._text = ""  # its text or arguments so far

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event of this type, with the next sequence number."""
        data = {"type": kind, "sequence_number": self.num_events, **fields}
        self.num_events += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def add(self, delta: ChatDelta) -> list[str]:
        """The events for what a delta adds: first the open call's further arguments, then
        text (a cut-off call's text comes with its last arguments), then new calls."""
        events = []
        pieces = list(delta.tool_calls)
        while pieces and "id" not in pieces[0]:
            events += self._piece(pieces.pop(0)["function"]["arguments"])
        if delta.content:
            if self._item is None or self._item["type"] != "message":
                events += self._close("completed")
                events += self._open(message_item(new_item_id("msg"), "", "in_progress"))
            events += self._piece(delta.content)
        for piece in pieces:
            if "id" in piece:  # a new call: its header, maybe some arguments
                events += self._close("completed")
                events += self._open(call_item(new_item_id("fc"), "call_" + piece["id"],
                                               piece["function"]["name"], "", "in_progress"))
            events += self._piece(piece["function"]["arguments"])
        return events

    def finish(self, status: str, usage: dict[str, Any]) -> list[str]:
        """Close the last item and end with the whole response."""
        events = []
        if self._item is None and not self.output:  # nothing generated: an empty message
            events += self._open(message_item(new_item_id("msg"), "", "in_progress"))
        events += self._close("incomplete" if status == "incomplete" else "completed")
        kind = {"incomplete": "response.incomplete"}.get(status, "response.completed")
        response = self.shell.render(status, output=self.output, usage=usage)
        return [*events, self.event(kind, response=self.shell.keep(response))]

    def failed(self, message: str) -> str:
        """response.failed, with the items completed before the failure."""
        error = {"code": "server_error", "message": message}
        response = self.shell.render("failed", output=self.output, error=error)
        return self.event("response.failed", response=self.shell.keep(response))

    def _where(self) -> dict[str, Any]:
        assert self._item is not None
        where = {"item_id": self._item["id"], "output_index": len(self.output)}
        return where if self._item["type"] == "function_call" else {**where, "content_index": 0}

    def _open(self, item: dict[str, Any]) -> list[str]:
        self._item, self._text = item, ""
        added = {**item, "content": []} if item["type"] == "message" else item
        events = [self.event("response.output_item.added", output_index=len(self.output),
                             item=added)]
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", **self._where(),
                                     part=text_part("")))
        return events

    def _piece(self, text: str) -> list[str]:
        assert self._item is not None
        if not text:
            return []
        self._text += text
        if self._item["type"] == "message":
            return [self.event("response.output_text.delta", **self._where(), delta=text,
                               logprobs=[])]
        return [self.event("response.function_call_arguments.delta", **self._where(),
                           delta=text)]

    def _close(self, status: str) -> list[str]:
        if self._item is None:
            return []
        item, where = self._item, self._where()
        if item["type"] == "message":
            done = message_item(item["id"], self._text, status)
            events = [self.event("response.output_text.done", **where, text=self._text,
                                 logprobs=[]),
                      self.event("response.content_part.done", **where,
                                 part=text_part(self._text))]
        else:
            calls = self.choice.streamer.calls if self.choice.streamer else []
            if all("call_" + call.id != item["call_id"] for call in calls):
                status = "incomplete"
            done = {**item, "arguments": self._text, "status": status}
            events = [self.event("response.function_call_arguments.done", **where,
                                 arguments=self._text)]
        events.append(self.event("response.output_item.done",
                                 output_index=where["output_index"], item=done))
        self.output.append(done)
        self._item, self._text = None, ""
        return events
