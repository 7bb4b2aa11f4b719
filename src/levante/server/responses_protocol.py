"""OpenAI Responses API request bodies (pydantic, the HTTP boundary), mapped to a chat request.

A Responses request runs on the chat-completions path; this module translates its shapes:

- `input` (a string, or items) and `instructions` -> chat messages, after the items of the
  conversation a `previous_response_id` continues (the previous response's input and output;
  its instructions are not carried over, as OpenAI's): a `message` item keeps its
  role and text parts; consecutive `function_call` items become one assistant turn's
  `tool_calls` (joined to the assistant message just before them, as `response.output` lists
  a message then its calls); a `function_call_output` item becomes a `tool` message.
- flat function tools `{"type": "function", "name", "parameters"}` -> chat's nested tools;
  tool_choice `{"type": "function", "name"}` -> `{"type": "function", "function": {"name"}}`.
- `text.format` (text | json_schema | json_object) -> chat's `response_format`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError

log = logging.getLogger(__name__)

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


@dataclass(frozen=True)
class ChatForm:
    """A Responses request as the chat path takes it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    response_format: dict[str, Any] | None


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Strict types, as OpenAI's API; unknown fields are logged."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True  # kept in memory for previous_response_id and GET (OpenAI's default)
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None  # no reasoning model here: ignored, as vLLM does
    background: bool = False

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(text) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"keys take at most {MAX_METADATA_KEY_CHARS} characters, "
                                 f"values {MAX_METADATA_VALUE_CHARS}")
        return value

    def check_supported(self) -> None:
        """Refuse what this server does not run; log unknown fields."""
        if self.background:
            raise RequestError("background responses are not supported on this server",
                               param="background")
        for name in self.model_extra or {}:
            if name == "conversation":
                raise RequestError("conversations are not stored on this server; send the "
                                   "whole conversation in `input`", param="conversation")
            log.info("ignoring unknown request field %r", name)

    def params(self) -> SamplingParams:
        """The engine's parameters (OpenAI's defaults: temperature 1, top_p 1)."""
        return SamplingParams(max_tokens=self.max_output_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p)

    def text_format(self) -> dict[str, Any]:
        """The `text.format` asked for ({"type": "text"} when none)."""
        fmt = (self.text or {}).get("format")
        return {"type": "text"} if fmt is None else fmt

    def to_chat(self, history: list[dict[str, Any]] | None = None) -> ChatForm:
        """The chat request this one runs as, continuing the `history` items (a previous
        response's conversation); RequestError naming the field otherwise."""
        return ChatForm(messages=chat_messages(self.input, self.instructions, history),
                        tools=None if self.tools is None else chat_tools(self.tools),
                        tool_choice=chat_tool_choice(self.tool_choice),
                        response_format=chat_response_format(self.text_format()))


def _bad_item(index: int, problem: str) -> RequestError:
    return RequestError(f"input[{index}]: {problem}", param="input")


def chat_messages(items: str | list[Any], instructions: str | None,
                  history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`instructions` as a system message, then the `history` items (already checked) and the
    input as chat messages. Errors count input items only: `history` items index below 0."""
    messages = [] if instructions is None else [{"role": "system", "content": instructions}]
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not items:
        raise RequestError("input is an empty list", param="input")
    history = history or []
    call_ids: set[str] = set()
    for index, item in enumerate([*history, *items], start=-len(history)):
        if not isinstance(item, dict):
            raise _bad_item(index, f"expected an object, got {type(item).__name__}")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(index, item))
        elif kind == "function_call":
            call_ids.add(_add_call(messages, index, item))
        elif kind == "function_call_output":
            messages.append(_tool_result(index, item, call_ids))
        else:
            raise _bad_item(index, f"items of type {kind!r} are not supported (message, "
                                   "function_call and function_call_output are)")
    return messages


def _message(index: int, item: dict[str, Any]) -> dict[str, Any]:
    role, content = item.get("role"), item.get("content")
    if role not in MESSAGE_ROLES:
        raise _bad_item(index, f"role must be one of {list(MESSAGE_ROLES)}, got {role!r}")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad_item(index, "content must be a string or a list of parts")
    return {"role": role, "content": [{"type": "text", "text": _part_text(index, part)}
                                      for part in content]}


def _part_text(index: int, part: Any) -> str:
    """The text of an input_text / output_text (or a refusal) part; other kinds are refused."""
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    key = "refusal" if kind == "refusal" else "text"
    if kind not in (*TEXT_PARTS, "refusal"):
        raise _bad_item(index, f"only text content is supported ({', '.join(TEXT_PARTS)}), "
                               f"got {kind!r}")
    text = part.get(key)
    if not isinstance(text, str):
        raise _bad_item(index, f"a {kind} part needs a string {key!r}")
    return text


def _add_call(messages: list[dict[str, Any]], index: int, item: dict[str, Any]) -> str:
    """Append a function call to the assistant turn just before it (or a new one)."""
    fields = {name: item.get(name) for name in ("call_id", "name", "arguments")}
    for name, value in fields.items():
        if not isinstance(value, str):
            raise _bad_item(index, f"a function_call needs a string {name!r}")
    call = {"id": fields["call_id"], "type": "function",
            "function": {"name": fields["name"], "arguments": fields["arguments"]}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return str(fields["call_id"])


def _tool_result(index: int, item: dict[str, Any], call_ids: set[str]) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or call_id not in call_ids:
        raise _bad_item(index, f"function_call_output call_id {str(call_id)[:64]!r} matches "
                               "no earlier function_call item")
    if isinstance(output, list):
        output = "".join(_part_text(index, part) for part in output)
    if not isinstance(output, str):
        raise _bad_item(index, "a function_call_output needs 'output' text")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Flat function tools as chat's nested ones; built-in tools are refused."""
    nested = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        if kind != "function":
            raise RequestError(f"tools[{index}]: {kind!r} tools are not supported; this "
                               "server runs function tools only", param="tools")
        nested.append({"type": "function", "function": {
            key: tool[key] for key in ("name", "description", "parameters") if key in tool}})
    return nested


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """auto | none | required as they are; {"type": "function", "name"} nested as chat's."""
    if choice is None or isinstance(choice, str):
        return choice
    name = choice.get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise RequestError('tool_choice must be "auto", "none", "required" or {"type": '
                           '"function", "name": ...}', param="tool_choice")
    return {"type": "function", "function": {"name": name}}


def chat_response_format(fmt: Any) -> dict[str, Any] | None:
    """`text.format` as chat's response_format (None for plain text)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {
            key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}}
    raise RequestError('text.format.type must be "text", "json_schema" or "json_object", '
                       f"got {kind!r}", param="text.format")
