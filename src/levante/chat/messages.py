"""OpenAI-shaped chat messages and tools, checked before any template sees them."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Protocol

from levante.errors import RequestError

Message = dict[str, Any]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MISTRAL_ID = re.compile(r"[a-zA-Z0-9]{9}")


class ChatFormat(Protocol):
    """Turns OpenAI-shaped messages (and tools) into prompt token ids."""

    def encode(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids; raises RequestError for messages the format cannot express."""
        ...


def to_mistral_id(openai_id: str) -> str:
    """A valid Mistral tool-call id (9 alphanumerics): kept if valid, else a sha256 prefix.

    Deterministic, so a call and its tool result map alike: "call_abc123" -> 9 hex digits.
    """
    if _MISTRAL_ID.fullmatch(openai_id):
        return openai_id
    return hashlib.sha256(openai_id.encode("utf-8")).hexdigest()[:9]


def request_error(index: int, problem: str) -> RequestError:
    """The 400 for a problem with messages[index]."""
    return RequestError(f"messages[{index}]: {problem}", param="messages")


def _check_content(index: int, content: Any, *, required: bool) -> None:
    """Content is a string or a list of {"type": "text", "text": str} parts."""
    if content is None:
        if required:
            raise request_error(index, "missing 'content'")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise request_error(
            index, f"'content' must be a string or a list of parts, not {type(content).__name__}"
        )
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise request_error(index, f"only text content parts are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise request_error(index, "a text content part needs a string 'text'")


def _check_tool_calls(index: int, tool_calls: Any) -> None:
    """tool_calls is a list of {"id", "type": "function", "function": {"name", "arguments"}},
    the arguments a JSON object (or its text, as OpenAI sends them)."""
    if not isinstance(tool_calls, list):
        raise request_error(index, "'tool_calls' must be a list")
    for number, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise request_error(index, "each tool call needs 'function' with a string 'name'")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as error:  # deep nesting recurses
                raise request_error(index, f"tool_calls[{number}].function.arguments is not valid "
                                   f"JSON: {error}") from None
        if not isinstance(arguments, dict):
            raise request_error(index, f"tool_calls[{number}].function.arguments must be a JSON "
                               f"object, got {type(arguments).__name__}")
        if not isinstance(call.get("id", ""), str):
            raise request_error(index, "tool call 'id' must be a string")


def check_messages(messages: Any) -> None:
    """Raise RequestError(param="messages") naming the first malformed message.

    A tool message's `tool_call_id` must name a call of an earlier assistant message: a
    result for an unknown call could not be shown against its call in any format.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise request_error(index, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise request_error(index, f"unknown role {role!r} (expected one of {sorted(ROLES)})")
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls is not None:
            _check_tool_calls(index, tool_calls)
            call_ids.update(call.get("id", "") for call in tool_calls)
        _check_content(
            index, message.get("content"), required=not (role == "assistant" and tool_calls)
        )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise request_error(index, "a tool message needs a string 'tool_call_id'")
            if call_id not in call_ids:
                raise request_error(index, f"tool_call_id {call_id[:64]!r} matches no tool call of an "
                                   "earlier assistant message")


def check_tools(tools: Any) -> None:
    """Tools are OpenAI function tools: {"type": "function", "function": {"name": str, ...}}."""
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"tools[{index}]: expected a function tool", param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"tools[{index}]: expected a function tool", param="tools")
        if not isinstance(function.get("name"), str):
            raise RequestError(f"tools[{index}]: the function needs a string 'name'", param="tools")
