"""Tool definitions and tool_choice, checked; call schemas and the "json" style's prompt text.

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

Parsing the model's calls back out of generated tokens: levante.chat.tool_calls.
"""

from __future__ import annotations

import json
import re
from typing import Any

from levante.errors import RequestError
from levante.tokenizer import MistralTokenizer, Tokenizer

CHAT_STYLES = ("mistral", "json")
TOOL_CHOICE_MODES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


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

