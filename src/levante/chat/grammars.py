"""Grammars of chat requests: response_format, tools and tool_choice -> one lark grammar.

A request's response_format, tools and tool_choice compile (`GrammarCompiler.compile`) to one
lark grammar over the model's tokens; each sequence runs a `Matcher` of it, and `fill_masks`
computes the allowed-token masks of a whole batch at once (llguidance, in parallel threads).

What the grammar allows, per chat style (call syntaxes: levante.chat.tools):

    nothing asked (no response_format, no tools or tool_choice "none") -> no grammar (None);
      except Mistral with tools and "none": text without control tokens, so no [TOOL_CALLS]
    response_format json_object / json_schema    -> that JSON, nothing around it
    tool_choice "required" or a named function   -> calls only, arguments per their schema
    tool_choice "auto", mistral  -> text | text? [TOOL_CALLS] calls (a call, once begun,
                                    is held to the schema; as mistral-common's grammar)
    tool_choice "auto", json     -> text not starting with "{" | the calls object
    "auto" with a response_format -> the requested JSON | the calls

JSON is compact (", " and ": " separators, no other whitespace), as mistral-common encodes
calls, and a finished value ends generation: `Matcher.is_finished` tells the engine to stop
(EOS is allowed only where the grammar may end, so the model can also end with EOS there).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from levante.chat.schema_recursion import check_recursion_ends
from levante.chat.tools import (
    CHAT_STYLES,
    MAX_SCHEMA_DEPTH,
    json_depth,
    resolve_tool_choice,
    tool_calls_schema,
    tool_calls_token_id,
    validate_tools,
)
from levante.errors import RequestError
from levante.structured import Grammar, llguidance_tokenizer, parser_limits
from levante.tokenizer import Tokenizer

# jsonschema and llguidance are imported where a schema or grammar first comes: a process that
# never constrains output (`levante generate`) does not pay their ~5 MB of RSS.

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 256 * 1024  # a request's schemas, as JSON text
MISTRAL_TEXT = r"TEXT: /(.|\n)+/"
JSON_STYLE_TEXT = r"TEXT: /[^{](.|\n)*/"


def response_schema(response_format: object) -> dict[str, Any] | None:
    """The JSON schema an OpenAI response_format asks for (None for text), checked."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise RequestError('response_format.type must be "text", "json_object" or '
                           f'"json_schema", got {kind!r}', param="response_format")
    assert isinstance(response_format, dict)  # kind came from it
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
    if json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise RequestError(f"response_format.json_schema.schema nests deeper than "
                           f"{MAX_SCHEMA_DEPTH} levels", param="response_format")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path)
        raise RequestError(f"response_format.json_schema.schema is not a valid JSON schema "
                           f"(at '{where}'): {error.message}", param="response_format") from None
    return schema


def _json_grammar(schema: dict[str, Any]) -> str:
    """A lark `%json` term for `schema`, compact (our JSON_OPTIONS override the schema's)."""
    options = {**schema.get("x-guidance", {}), **JSON_OPTIONS}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _check_supported(schema: dict[str, Any], param: str, what: str) -> None:
    """RequestError naming the feature if llguidance cannot compile `schema`, or if its
    recursion cannot end (llguidance would fail mid-generation)."""
    check_recursion_ends(schema, param=param, what=what)
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark("start: " + _json_grammar(schema))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=parser_limits())
    if is_error:
        raise RequestError(f"{what} is not supported for constrained decoding: {messages[0]}",
                           param=param)


def grammar_source(tokenizer: Tokenizer, *, schema: dict[str, Any] | None, mode: str,
                   tools: list[dict[str, Any]], parallel_tool_calls: bool,
                   chat_style: str) -> str | None:
    """The lark grammar for a checked request (see the module docstring), None if unconstrained."""
    wants_calls = mode != "none"
    if not wants_calls and schema is None:
        if chat_style == "mistral" and tools:
            return f"start: TEXT\n{MISTRAL_TEXT}\n"
        return None
    answer = _json_grammar(schema) if schema is not None else None
    if not wants_calls:
        return f"start: {answer}\n"
    calls = _json_grammar(tool_calls_schema(tools, parallel=parallel_tool_calls, style=chat_style))
    if chat_style == "mistral":
        calls = f"<[{tool_calls_token_id(tokenizer)}]> {calls}"
    if mode == "required":
        return f"start: {calls}\n"
    if answer is not None:
        return f"start: {answer} | {calls}\n"
    if chat_style == "mistral":
        return f"start: TEXT | TEXT? {calls}\n{MISTRAL_TEXT}\n"
    return f"start: TEXT | {calls}\n{JSON_STYLE_TEXT}\n"


class GrammarCompiler:
    """Compiles request constraints for one tokenizer; owns llguidance's tokenizer and threads.

    Keeps the last `cache_size` compiled grammars (and refusals): agents send the same tools
    every turn, and 128 tools take ~0.2 s to validate and compile.
    One per model (the engine's), safe to call from several threads.
    """

    def __init__(self, tokenizer: Tokenizer, *, cache_size: int = 64,
                 num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.ll_tokenizer = llguidance_tokenizer(tokenizer)
        self.vocab_size = self.ll_tokenizer.vocab_size  # may differ from the model's logits
        import llguidance

        self.executor = llguidance.LLExecutor(num_threads)
        self._cache: OrderedDict[str, Grammar | RequestError | None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, *, response_format: dict[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None,
                tool_choice: str | dict[str, Any] | None = None,
                parallel_tool_calls: bool = True, chat_style: str) -> Grammar | None:
        """The grammar for an OpenAI-style request, or None when nothing constrains it.

        Raises RequestError (param response_format, tools or tool_choice) for malformed,
        invalid or unsupported schemas and tool settings.
        """
        if chat_style not in CHAT_STYLES:
            raise ValueError(f"chat_style must be one of {CHAT_STYLES}, got {chat_style!r}")
        try:
            key = json.dumps([response_format, tools, tool_choice, parallel_tool_calls,
                              chat_style])
        except (TypeError, ValueError) as error:
            raise RequestError(f"response_format and tools must be plain JSON: {error}",
                               param="response_format" if response_format else "tools") from None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                cached = self._cache[key]
                if isinstance(cached, RequestError):  # a fresh one: tracebacks would pile up
                    raise RequestError(str(cached), param=cached.param, code=cached.code)
                return cached
        try:
            grammar = self._compile(response_format, tools, tool_choice, parallel_tool_calls,
                                    chat_style, num_chars=len(key))
        except RequestError as error:  # a refusal is remembered too: a client may repeat it
            self._remember(key, error)
            raise
        self._remember(key, grammar)
        return grammar

    def _remember(self, key: str, result: Grammar | RequestError | None) -> None:
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _compile(self, response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None,
                 tool_choice: str | dict[str, Any] | None, parallel_tool_calls: bool,
                 chat_style: str, *, num_chars: int) -> Grammar | None:
        if num_chars > MAX_SCHEMA_CHARS:
            raise RequestError(f"response_format and tools take {num_chars} characters of "
                               f"JSON; at most {MAX_SCHEMA_CHARS} can be compiled",
                               param="tools" if tools else "response_format")
        schema = response_schema(response_format)
        if schema is not None:
            _check_supported(schema, "response_format", "response_format.json_schema.schema")
        checked = validate_tools(tools) if tools is not None else []
        mode, allowed = resolve_tool_choice(checked, tool_choice)
        if mode != "none":
            for index, tool in enumerate(checked):
                _check_supported(tool["function"]["parameters"], "tools",
                                 f"tools[{index}].function.parameters")
        source = grammar_source(self.tokenizer, schema=schema, mode=mode, tools=allowed,
                                parallel_tool_calls=parallel_tool_calls, chat_style=chat_style)
        if source is None:
            return None
        return Grammar(self, source, param="tools" if mode != "none" else "response_format")
