"""ChatRequest: a conversation with its tools and output format, as prompt ids and a grammar.

One place decides how tools reach the model and what output is allowed, for the OpenAI and
Ollama routes and the Python API alike:

- Mistral models ("mistral" style): tools go into the V7 prompt ([AVAILABLE_TOOLS]) through
  mistral-common; calls come back as [TOOL_CALLS][...].
- Other chat templates ("json" style): the tools are described in the system prompt
  (`levante.chat.tools.tools_system_prompt`) and a call is the JSON object
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}`; the grammar forces that shape once
  the reply starts with "{" (auto) or from the first token (required / a named function).
  Earlier calls and results in the history are shown in that same style when the template
  has no tools of its own (`levante.chat.JinjaChatFormat`), never dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from levante.bundle import Bundle
from levante.chat import MistralChatFormat, check_messages
from levante.chat.grammars import GrammarCompiler
from levante.chat.tools import resolve_tool_choice, tools_system_prompt, validate_tools
from levante.errors import ContextLengthError, RequestError
from levante.structured import Grammar
from levante.tokenizer import longer_than_chars


@dataclass(frozen=True)
class PreparedChat:
    """What the engine needs for one chat request."""

    prompt_ids: list[int]
    grammar: Grammar | None
    tool_style: str | None  # "mistral" | "json" when the reply may hold tool calls


class ChatRequests:
    """Prepares chat requests for one model; compiles grammars with a shared, cached compiler."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.style = "mistral" if isinstance(bundle.chat_format, MistralChatFormat) else "json"
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use: llguidance's tokenizer takes a moment for a large vocabulary."""
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.bundle.tokenizer)
            return self._compiler

    def warm_up(self) -> None:
        """Build what the first chat request would: the grammar compiler, and whatever the
        chat format builds on its first prompt."""
        self.compiler  # noqa: B018 - the property builds it
        if self.bundle.chat_format is not None:
            self.prepare([{"role": "user", "content": "Hi"}])

    def prepare(self, messages: list[dict[str, Any]], *,
                tools: list[dict[str, Any]] | None = None,
                tool_choice: str | dict[str, Any] | None = None,
                response_format: dict[str, Any] | None = None,
                parallel_tool_calls: bool = True) -> PreparedChat:
        """Prompt ids and grammar; RequestError naming the field for anything invalid."""
        chat_format = self.bundle.chat_format
        if chat_format is None:
            raise RequestError("this model has no chat template; use /v1/completions",
                               param="messages")
        check_messages(messages)  # before a tools prompt shifts the indexes errors name
        check_prompt_size(self.bundle, sum(map(_text_chars, messages)), param="messages")
        checked = validate_tools(tools) if tools else []
        mode, _ = resolve_tool_choice(checked, tool_choice)
        grammar = None
        if checked or response_format is not None:
            grammar = self.compiler.compile(
                response_format=response_format, tools=checked or None,
                tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                chat_style=self.style)
        calls_possible = bool(checked) and mode != "none"
        if self.style == "mistral":
            prompt = chat_format.encode(messages, tools=checked or None)
        else:
            prompt = chat_format.encode(
                with_tools_prompt(messages, checked) if calls_possible else messages)
        return PreparedChat(prompt, grammar, self.style if calls_possible else None)


def with_tools_prompt(messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with the tools described in the system prompt (added or extended)."""
    text = tools_system_prompt(tools)
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):  # text parts
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        first["content"] = f"{content or ''}\n\n{text}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def check_prompt_size(bundle: Bundle, num_chars: int, *, param: str) -> None:
    """ContextLengthError, before any tokenizing, for text that cannot fit the context (each
    token stands for at most `max_token_chars` characters): a 1 MB prompt is refused in
    microseconds instead of after ~0.5 s of tokenizing."""
    limit = bundle.config.max_seq_len
    if longer_than_chars(bundle.tokenizer, num_chars, limit):
        raise ContextLengthError(
            f"the prompt has {num_chars} characters, more than this model's context of "
            f"{limit} tokens can hold", param=param)


def _text_chars(message: Any) -> int:
    """Characters of a message's string content and text parts (what the check counts)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
