"""Tool-call parsing: generated token ids -> content and OpenAI-shaped calls, streamed or whole.

The call syntaxes are levante.chat.tools' chat styles: Mistral V7's [TOOL_CALLS] control token
then a JSON array ("mistral"), or one JSON object that is the whole reply ("json"). Both
`ToolCallStreamer` (a reply as it streams) and `parse_tool_calls` (a finished one) yield
OpenAI-shaped calls: `{"id", "type": "function", "function": {"name", "arguments"}}` with
`arguments` the generated JSON text. A call cut off by max_tokens is never reported as a call:
its text stays content (the finish_reason is "length").
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from levante.chat.tools import CHAT_STYLES, tool_calls_token_id
from levante.engine.output import StopStrings
from levante.tokenizer import IncrementalDetokenizer, Tokenizer

ID_ALPHABET = string.ascii_letters + string.digits
JSON_CALLS_PREFIX = '{"tool_calls":['  # how a json-style call starts, whitespace removed
# A call object that names its function first; its arguments follow the match.
NAME_FIRST = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made; `arguments` is its JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's `message.tool_calls[]` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_tool_call_id() -> str:
    """A fresh call id: 9 random alphanumerics, valid for Mistral V7 and for OpenAI clients."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


@dataclass
class ChatDelta:
    """What new tokens add to an assistant message: text, and OpenAI `delta.tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add_call_piece(self, index: int, arguments: str, *, header: ToolCall | None = None) -> None:
        """Append a call's start (id, name) and/or arguments text, merged per call index."""
        if header is None and not arguments:
            return
        if header is not None:
            self.tool_calls.append({"index": index, "id": header.id, "type": "function",
                                    "function": {"name": header.name, "arguments": ""}})
        elif not self.tool_calls or self.tool_calls[-1]["index"] != index:
            self.tool_calls.append({"index": index, "function": {"arguments": ""}})
        self.tool_calls[-1]["function"]["arguments"] += arguments


@dataclass
class _Call:
    """A call object being parsed: where it starts, its header, how far its arguments got."""

    start: int
    header: ToolCall | None = None
    args_start: int = 0
    scan: int = 0  # next character of the arguments to scan
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    is_invalid: bool = False  # the arguments are not an object
    args_end: int | None = None  # one past the arguments' closing brace


class ToolCallStreamer:
    """Turns generated token ids into content text and OpenAI tool-call deltas, as they come.

    Each call goes out as soon as its name is known (index, id, type, name, arguments ""),
    then its arguments text in pieces; `calls` lists the calls completed so far. Works on
    token ids because the Mistral call marker is a control token that text never contains.
    Grammar-constrained output always has the name first; other call objects are reported
    whole once complete, and text that is no call at all becomes content.
    """

    def __init__(self, tokenizer: Tokenizer, *, style: str, stop: Sequence[str] = (),
                 include_stop: bool = False) -> None:
        if style not in CHAT_STYLES:
            raise ValueError(f"style must be one of {CHAT_STYLES}, got {style!r}")
        self.style = style
        # The request's stop strings cut the content as they cut plain text (the engine
        # already stopped generating at them); a possible partial one is held back.
        self._stops = StopStrings(stop, include_stop=include_stop)
        self._marker = tool_calls_token_id(tokenizer) if style == "mistral" else None
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        # mistral: content -> open (after [TOOL_CALLS]) -> calls -> after (array closed)
        # json: start (undecided) -> content, or -> calls -> after
        self._mode = "content" if style == "mistral" else "start"
        self._text = ""  # call text (mode calls/after) or undecided text (mode start)
        self._pos = 0  # first character of _text not yet parsed
        self._call: _Call | None = None
        self._num_started = 0
        self.calls: list[ToolCall] = []

    def add(self, token_ids: Sequence[int]) -> ChatDelta:
        """Consume new token ids; return the content and call pieces they complete."""
        delta = self._add(token_ids)
        self._stops.add(delta.content)
        delta.content = self._stops.take(final=False)
        return delta

    def finish(self) -> ChatDelta:
        """Flush at the end of generation; unparsed call text (a cut-off call) becomes content."""
        delta = self._finish()
        self._stops.add(delta.content)
        delta.content = self._stops.take(final=True)
        return delta

    def _add(self, token_ids: Sequence[int]) -> ChatDelta:
        delta = ChatDelta()
        for token_id in token_ids:
            if token_id != self._marker:
                self._route(self._detokenizer.add(token_id), delta)
                continue
            self._route(self._detokenizer.flush(), delta)
            if self._mode == "after":
                delta.content += self._text[self._pos:]
            if self._mode in ("content", "after"):
                self._mode, self._text, self._pos = "open", "", 0
        return delta

    def _finish(self) -> ChatDelta:
        delta = ChatDelta()
        self._route(self._detokenizer.flush(), delta)
        if self._mode in ("start", "open"):
            delta.content += self._text
        elif self._mode == "calls":
            delta.content += self._text[self._call.start if self._call else self._pos:]
        elif self._mode == "after":
            trailing = self._text[self._pos:].strip()
            if self.style == "json":
                trailing = trailing.removeprefix("}").strip()
            delta.content += trailing
        self._mode, self._text, self._pos, self._call = "content", "", 0, None
        return delta

    def _route(self, text: str, delta: ChatDelta) -> None:
        if self._mode == "content":
            delta.content += text
            return
        self._text += text
        if self._mode == "start":
            self._classify(delta)
        if self._mode == "open":
            self._open(delta)
        if self._mode == "calls":
            self._parse_calls(delta)

    def _classify(self, delta: ChatDelta) -> None:
        """json style: decide whether the reply is a call object or text."""
        compact = re.sub(r"\s+", "", self._text)
        if compact.startswith(JSON_CALLS_PREFIX):
            self._mode, self._pos = "calls", self._text.index("[") + 1
        elif not JSON_CALLS_PREFIX.startswith(compact):
            self._mode = "content"
            delta.content += self._text
            self._text = ""

    def _open(self, delta: ChatDelta) -> None:
        """mistral style: the calls array opens right after [TOOL_CALLS]."""
        start = _skip(self._text, 0, " \t\r\n")
        if start < len(self._text):
            if self._text[start] == "[":
                self._mode, self._pos = "calls", start + 1
            else:
                self._give_up(delta)

    def _parse_calls(self, delta: ChatDelta) -> None:
        """Parse `[call, call, ...]` text as far as it has arrived."""
        while self._mode == "calls":
            if self._call is None:
                self._pos = _skip(self._text, self._pos, " \t\r\n,")
                if self._pos == len(self._text):
                    return
                if self._text[self._pos] == "]":
                    self._mode, self._pos = "after", self._pos + 1
                    return
                self._call = _Call(start=self._pos)
            if not self._advance_call(self._call, delta):
                return

    def _advance_call(self, call: _Call, delta: ChatDelta) -> bool:
        """Parse more of the current call; True once it is complete."""
        text = self._text
        if call.header is None:
            match = NAME_FIRST.match(text, call.start)
            if match is None:
                return self._take_whole_call(call, delta)
            call.header = ToolCall(new_tool_call_id(), json.loads(match.group(1)), "")
            call.args_start = call.scan = match.end()
            delta.add_call_piece(self._num_started, "", header=call.header)
            self._num_started += 1
        if call.args_end is None:
            before = _skip(text, call.scan, " \t\r\n") if call.scan == call.args_start \
                else call.scan  # arguments text starts at its "{"
            _scan_object(call, text)
            if call.is_invalid:
                return self._give_up(delta)
            delta.add_call_piece(self._num_started - 1, text[before:call.args_end or call.scan])
            if call.args_end is None:
                return False
        end = _skip(text, call.args_end, " \t\r\n")
        if end == len(text):
            return False
        if text[end] != "}":  # more keys after the arguments: wait for the whole object
            return self._take_whole_call(call, delta)
        self.calls.append(ToolCall(call.header.id, call.header.name,
                                   text[call.args_start:call.args_end].strip()))
        self._pos, self._call = end + 1, None
        return True

    def _take_whole_call(self, call: _Call, delta: ChatDelta) -> bool:
        """A call object not in name-first form: report it once it is complete JSON."""
        try:
            value, end = json.JSONDecoder().raw_decode(self._text, call.start)
        except json.JSONDecodeError:
            return False  # incomplete (or not JSON: finish() turns it into content)
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                and isinstance(value.get("arguments"), dict)):
            return self._give_up(delta)
        if call.header is None:
            arguments = json.dumps(value["arguments"], ensure_ascii=False)
            call.header = ToolCall(new_tool_call_id(), value["name"], "")
            delta.add_call_piece(self._num_started, arguments, header=call.header)
            self._num_started += 1
        else:
            assert call.args_end is not None
            arguments = self._text[call.args_start:call.args_end].strip()
        self.calls.append(ToolCall(call.header.id, call.header.name, arguments))
        self._pos, self._call = end, None
        return True

    def _give_up(self, delta: ChatDelta) -> bool:
        """Not a call after all (only possible without a grammar): the rest is content."""
        start = self._call.start if self._call else self._pos
        delta.content += self._text[start:]
        self._mode, self._text, self._pos, self._call = "content", "", 0, None
        return False


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _scan_object(call: _Call, text: str) -> None:
    """Advance over a JSON object's text, tracking strings and nesting, to its closing brace.

    Hand-written because json's decoder has no incremental mode: this finds where the
    arguments end so that they stream without the call's own closing brace.
    """
    pos = call.scan
    while pos < len(text):
        char = text[pos]
        pos += 1
        if call.in_string:
            if call.escaped:
                call.escaped = False
            elif char == "\\":
                call.escaped = True
            elif char == '"':
                call.in_string = False
        elif call.depth == 0 and char != "{":
            if char not in " \t\r\n":
                call.is_invalid = True
                break
        elif char == '"':
            call.in_string = True
        elif char in "{[":
            call.depth += 1
        elif char in "}]":
            call.depth -= 1
            if call.depth == 0:
                call.args_end = pos
                break
    call.scan = pos


def parse_tool_calls(token_ids: Sequence[int], tokenizer: Tokenizer, *, style: str,
                     stop: Sequence[str] = (), include_stop: bool = False
                     ) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished generation; content is None when there are only calls.
    The same streamer as a streamed reply's, so both give the same message."""
    streamer = ToolCallStreamer(tokenizer, style=style, stop=stop, include_stop=include_stop)
    content = streamer.add(token_ids).content + streamer.finish().content
    if streamer.calls and not content.strip():
        return None, streamer.calls
    return content, streamer.calls
