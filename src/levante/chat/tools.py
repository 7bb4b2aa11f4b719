"""Tool definitions, tool_choice and tool-call parsing: Mistral V7 [TOOL_CALLS] and JSON-in-text for templates without tools.

Two call syntaxes ("chat styles"), both constrained by grammar (levante.chat.grammars):

- "mistral": what mistral-common's V7 instruct tokenizer encodes for an assistant turn with
  calls, and so what Mistral Small 3 emits: the control token [TOOL_CALLS] (id 9) followed by
  a JSON array, `[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]`. Text
  may come before the token (with tool_choice "auto"). V7 history shows each call's "id" after
  its arguments, so the grammar lets the model write one, but every call gets a fresh id of 9
  alphanumerics (a model may copy an old one), the only form V7 accepts back in the history.
- "json", for chat templates without tool support (SmolLM2's ChatML): the system prompt
  (`tools_system_prompt`) describes the tools, and a call is one JSON object, the whole reply:
  `{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}`. One shape for
  one or many calls (maxItems 1 without parallel_tool_calls). With tool_choice "auto" a reply
  whose first character is "{" is a call (and the grammar holds it to this shape); any other
  reply is text. With a response_format as well, a "{" reply is either this object or the
  requested JSON; a reply starting `{"tool_calls": [` counts as calls.

In the history, a chat template that knows no tools (no `tool_calls` in it) is given the
"json" style's own text instead (levante.chat renders it): an assistant turn's calls become
its content, `json_calls_text`, exactly the reply the model was asked for; a tool result
becomes `json_result_text`, tagged with its call's id and function name.

Parsing works on generated token ids, streaming or not (`ToolCallStreamer`, `parse_tool_calls`),
and yields OpenAI-shaped calls: `{"id", "type": "function", "function": {"name", "arguments"}}`
with `arguments` the generated JSON text. A call cut off by max_tokens is never reported as a
call: its text stays content (the finish_reason is "length").
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from levante.engine.output import StopStrings
from levante.errors import RequestError
from levante.tokenizer import IncrementalDetokenizer, MistralTokenizer, Tokenizer

CHAT_STYLES = ("mistral", "json")
TOOL_CHOICE_MODES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
ID_ALPHABET = string.ascii_letters + string.digits
MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
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


def _bad_tool(index: int, what: str) -> RequestError:
    return RequestError(f"tools[{index}]{what}", param="tools")


MAX_SCHEMA_DEPTH = 64  # JSON nesting of a schema (jsonschema's checker recurses: 200 -> 500s)


def json_depth(value: Any) -> int:
    """How deep dicts and lists nest in `value`, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1)
                         for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_parameters(index: int, parameters: object) -> dict[str, Any]:
    if parameters is None:
        return dict(NO_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise _bad_tool(index, '.function.parameters must be a JSON schema with "type": "object"')
    if json_depth(parameters) > MAX_SCHEMA_DEPTH:
        raise _bad_tool(index, f".function.parameters nests deeper than {MAX_SCHEMA_DEPTH} "
                               f"levels")
    import jsonschema  # here, not at import: only requests with tools need it (~2 MB RSS)

    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path)
        raise _bad_tool(index, f".function.parameters is not a valid JSON schema "
                               f"(at '{where}'): {error.message}") from None
    return parameters


def validate_tools(tools: object) -> list[dict[str, Any]]:
    """OpenAI tool definitions, checked and normalized (parameters default to no arguments)."""
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list, got {type(tools).__name__}", param="tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    checked: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad_tool(index, ' must be an object with "type": "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad_tool(index, ".function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise _bad_tool(index, f".function.name must be 1-64 of a-z, A-Z, 0-9, _ and -, "
                                   f"got {name!r}")
        if any(t["function"]["name"] == name for t in checked):
            raise _bad_tool(index, f".function.name {name!r} is already used by another tool")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise _bad_tool(index, ".function.description must be a string")
        parameters = _check_parameters(index, function.get("parameters"))
        checked.append({"type": "function", "function": {
            "name": name, "description": description, "parameters": parameters}})
    return checked


def resolve_tool_choice(tools: list[dict[str, Any]],
                        tool_choice: str | dict[str, Any] | None) -> tuple[str, list[dict[str, Any]]]:
    """("none" | "auto" | "required", the tools a call may use); a named function -> required."""
    if tool_choice is None or (tool_choice == "auto" and not tools):
        return ("auto" if tools else "none"), tools
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise RequestError(f"tool_choice must be one of {list(TOOL_CHOICE_MODES)} or a "
                               f"named function, got {tool_choice!r}", param="tool_choice")
        if tool_choice == "required" and not tools:
            raise RequestError('tool_choice "required" needs tools', param="tool_choice")
        return tool_choice, tools
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise RequestError('a named tool_choice must be {"type": "function", "function": '
                           '{"name": ...}}', param="tool_choice")
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        known = [t["function"]["name"] for t in tools]
        raise RequestError(f"tool_choice names {name!r}, which is not among the tools {known}",
                           param="tool_choice")
    return "required", chosen


def tool_calls_schema(tools: list[dict[str, Any]], *, parallel: bool, style: str) -> dict[str, Any]:
    """JSON schema of what follows [TOOL_CALLS] ("mistral") or of the whole reply ("json")."""
    calls = []
    for tool in tools:
        function = tool["function"]
        # Nested under our schema, the parameters' own "#/..." refs need their own base URI.
        arguments = {"$id": f"urn:levante:tool:{function['name']}", **function["parameters"]}
        properties = {"name": {"const": function["name"]}, "arguments": arguments}
        if style == "mistral":  # V7 history carries ids, so the model may write one (unused)
            properties["id"] = {"type": "string", "pattern": MISTRAL_ID.pattern}
        calls.append({"type": "object", "properties": properties,
                      "required": ["name", "arguments"], "additionalProperties": False})
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1
                             else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    if style == "mistral":
        return array
    return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
            "additionalProperties": False}


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """System-prompt text describing the tools and the JSON call format (the "json" style)."""
    listing = json.dumps([t["function"] for t in tools], ensure_ascii=False, indent=1)
    return ("You can call these functions (JSON schemas of their arguments given):\n"
            f"{listing}\n"
            "To call functions, reply with only this JSON object and nothing else:\n"
            '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}\n'
            "Otherwise reply in plain text, not starting with \"{\".")


def json_calls_text(tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI-shaped calls as the "json" style's reply, for a template without tools:

    [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
    "arguments": '{"city": "Paris"}'}}] ->
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    (the arguments may be given as text or, as templates see them, already parsed).
    """
    calls = []
    for call in tool_calls:
        function = call["function"]
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        calls.append({"name": function["name"], "arguments": arguments})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def json_result_text(call_id: str, name: str | None, content: str) -> str:
    """A tool result for a template without tools, tagged with its call, e.g.
    '{"tool_call_id": "call_1", "name": "get_weather", "content": "22C, sunny"}'."""
    return json.dumps({"tool_call_id": call_id, "name": name, "content": content},
                      ensure_ascii=False)


def tool_calls_token_id(tokenizer: Tokenizer) -> int:
    """The id of Mistral's [TOOL_CALLS] control token (9 in Tekken V7)."""
    if not isinstance(tokenizer, MistralTokenizer):
        raise TypeError("the mistral chat style needs a Mistral (Tekken) tokenizer")
    return int(tokenizer.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]"))


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


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


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
