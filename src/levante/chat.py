"""Chat formats: Mistral V7 through mistral-common, sandboxed Jinja templates from GGUF/HF, tool-call parsing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from levante.errors import ModelFileError, RequestError
from levante.tokenizer import MistralTokenizer, Tokenizer
from levante.tools import json_calls_text, json_result_text

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # mistral-common and pydantic (~0.45 s to import) load for Tekken models only
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

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


def _fail(index: int, problem: str) -> RequestError:
    return RequestError(f"messages[{index}]: {problem}", param="messages")


def _check_content(index: int, content: Any, *, required: bool) -> None:
    """Content is a string or a list of {"type": "text", "text": str} parts."""
    if content is None:
        if required:
            raise _fail(index, "missing 'content'")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _fail(
            index, f"'content' must be a string or a list of parts, not {type(content).__name__}"
        )
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _fail(index, f"only text content parts are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise _fail(index, "a text content part needs a string 'text'")


def _check_tool_calls(index: int, tool_calls: Any) -> None:
    """tool_calls is a list of {"id", "type": "function", "function": {"name", "arguments"}},
    the arguments a JSON object (or its text, as OpenAI sends them)."""
    if not isinstance(tool_calls, list):
        raise _fail(index, "'tool_calls' must be a list")
    for number, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _fail(index, "each tool call needs 'function' with a string 'name'")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as error:  # deep nesting recurses
                raise _fail(index, f"tool_calls[{number}].function.arguments is not valid "
                                   f"JSON: {error}") from None
        if not isinstance(arguments, dict):
            raise _fail(index, f"tool_calls[{number}].function.arguments must be a JSON "
                               f"object, got {type(arguments).__name__}")
        if not isinstance(call.get("id", ""), str):
            raise _fail(index, "tool call 'id' must be a string")


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
            raise _fail(index, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise _fail(index, f"unknown role {role!r} (expected one of {sorted(ROLES)})")
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
                raise _fail(index, "a tool message needs a string 'tool_call_id'")
            if call_id not in call_ids:
                raise _fail(index, f"tool_call_id {call_id[:64]!r} matches no tool call of an "
                                   "earlier assistant message")


def _check_tools(tools: Any) -> None:
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


def _with_mistral_ids(message: Message) -> Message:
    """A copy of `message` with OpenAI tool-call ids mapped by `to_mistral_id`."""
    message = {key: value for key, value in message.items() if value is not None}
    if isinstance(message.get("tool_call_id"), str):
        message["tool_call_id"] = to_mistral_id(message["tool_call_id"])
    if message.get("tool_calls"):
        message["tool_calls"] = [
            {**call, "id": to_mistral_id(call["id"])} if isinstance(call.get("id"), str) else call
            for call in message["tool_calls"]
        ]
    return message


def _describe(error: Exception) -> str:
    """A pydantic error as one short line per problem ("tool_calls.0.id: ..."), else str()."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    details = [
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
        for item in error.errors()[:3]
    ]
    return "; ".join(details)


class MistralChatFormat:
    """Mistral's instruct format (V7 for Mistral Small 3), encoded by mistral-common itself."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.mistral import (
            MistralTokenizer as MistralCommonTokenizer,
        )

        self.tokenizer = tokenizer
        self._mistral = tokenizer.mistral
        tekken = tokenizer.mistral.instruct_tokenizer.tokenizer
        # Same encoder, validated without the "last message is user or tool" rule, so a
        # finished conversation (ending with an assistant turn) encodes for training/scoring.
        self._mistral_any_last = MistralCommonTokenizer(
            tokenizer.mistral.instruct_tokenizer,
            validator=get_validator(tekken.version, ValidationMode.agnostic),
            request_normalizer=get_normalizer(tekken.version, tekken.model_settings_builder),
        )

    def request(
        self, messages: list[Message], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatCompletionRequest:
        """The mistral-common request for OpenAI-shaped messages (tool-call ids mapped)."""
        from mistral_common.protocol.instruct.converters import (
            convert_openai_messages,
            convert_openai_tools,
        )
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        check_messages(messages)
        if tools is not None:
            _check_tools(tools)
        converted = []
        for index, message in enumerate(messages):
            try:
                converted.extend(convert_openai_messages([_with_mistral_ids(message)]))
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                raise _fail(index, _describe(error)) from None
        try:
            mistral_tools = None if tools is None else convert_openai_tools(tools)
            return ChatCompletionRequest(messages=converted, tools=mistral_tools)
        except ValueError as error:
            raise RequestError(f"invalid tools: {_describe(error)}", param="tools") from None

    def encode(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids; with add_generation_prompt the last message must be user or tool."""
        from mistral_common.exceptions import MistralCommonException

        request = self.request(messages, tools=tools)
        encoder = self._mistral if add_generation_prompt else self._mistral_any_last
        try:
            tokens: list[int] = encoder.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError) as error:
            problem = f"messages rejected by the Mistral chat format: {_describe(error)}"
            raise RequestError(problem, param="messages") from None
        return tokens


class _RenderTimeout(Exception):
    """A template render ran past its time budget."""


class _RenderTooLarge(Exception):
    """A template render's output ran past its size budget."""


# What one render may write or build (characters): a prompt is at most the request body (8 MB
# by default) plus the template's own text. The time budget alone let a looping template
# pile up gigabytes of small strings before its 5 s were over.
MAX_RENDER_CHARS = 32 * 2**20


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names (as transformers does for Hub templates)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates may not set underscore names on a namespace: {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker): renders the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, **options: Any) -> str:
    """HF's `tojson`: json.dumps with indent/separators/sort_keys (Jinja's own escapes HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, **options)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """HF's chat-template environment, stricter: unsafe attributes raise at once (instead of
    rendering as empty), and `*`, `**`, `+` and `%` refuse results big enough to exhaust
    memory (as do the padding filters, below)."""

    MAX_REPEAT = 1_000_000
    MAX_EXPONENT = 256
    MAX_WIDTH = 100_000  # of a %-format field or a padding filter
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        for seq, count in ((left, right), (right, left)):
            is_repeat = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
            if operator == "*" and is_repeat and len(seq) * count > self.MAX_REPEAT:
                raise SecurityError(f"repetition to {len(seq) * count} items is not allowed")
        if operator == "**" and isinstance(right, int) and right > self.MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "%" and isinstance(left, str):
            _check_widths(left, self.MAX_WIDTH)
        result = super().call_binop(context, operator, left, right)
        if operator == "+" and isinstance(result, (str, list, tuple)) \
                and len(result) > MAX_RENDER_CHARS:
            raise SecurityError(f"a value of {len(result)} items is not allowed")
        return result


FORMAT_WIDTHS = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?")


def _check_widths(spec: str, limit: int) -> None:
    """`"%999999999d" % 1` would allocate a gigabyte: refuse widths and precisions past
    `limit` in a %-format string."""
    for match in FORMAT_WIDTHS.finditer(spec):
        if any(n and int(n) > limit for n in match.groups()):
            raise SecurityError(f"a format width over {limit} is not allowed")


def _bounded(name: str, filter_: Any, limit: int) -> Any:
    """A padding filter (`center`, `indent`, `format`) that refuses widths past `limit`."""
    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "format":
            _check_widths(str(value), limit)
        elif any(isinstance(a, int) and a > limit for a in (*args, *kwargs.values())):
            raise SecurityError(f"{name} wider than {limit} is not allowed")
        return filter_(value, *args, **kwargs)
    return bounded


def _environment() -> _ChatSandbox:
    env = _ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "format"):
        env.filters[name] = _bounded(name, env.filters[name], _ChatSandbox.MAX_WIDTH)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    env.globals["namespace"] = _Namespace
    return env


def _encode_outside_content(tokenizer: Any, text: str, spans: list[tuple[int, int]],
                            specials: dict[str, int]) -> list[int]:
    """Ids of `text`: special-token strings outside `spans` are control tokens; everything
    else, contents included, is plain text encoded in runs between control tokens."""
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    ids: list[int] = []
    run: list[str] = []
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        template_part = text[pos:start]
        last = 0
        for match in pattern.finditer(template_part):
            run.append(template_part[last:match.start()])
            if "".join(run):
                ids += tokenizer.encode_text("".join(run))
            run = []
            ids.append(specials[match.group()])
            last = match.end()
        run.append(template_part[last:])
        run.append(text[start:end])
        pos = end
    if "".join(run):
        ids += tokenizer.encode_text("".join(run))
    return ids


def _template_message(message: Message) -> Message:
    """What a template sees: None keys dropped, text parts joined, tool arguments as dicts
    (HF's convention), and an assistant turn with calls has a string content ("" if none)."""
    message = {key: value for key, value in message.items() if value is not None}
    if isinstance(message.get("content"), list):
        message["content"] = "\n".join(part["text"] for part in message["content"])
    calls = []
    for call in message.get("tool_calls", []):
        function = dict(call["function"])
        if isinstance(function.get("arguments"), str):  # valid JSON: check_messages ran
            function["arguments"] = json.loads(function["arguments"])
        calls.append({**call, "function": function})
    if calls:
        message["tool_calls"] = calls
        message.setdefault("content", "")
    return message


def _reads_tool_calls(tree: jinja2.nodes.Template) -> bool:
    """Whether a parsed template reads `tool_calls` (m.tool_calls, m['tool_calls'], 'tool_calls'
    in m): one that never does has no way to show calls."""
    for node in tree.find_all((jinja2.nodes.Getattr, jinja2.nodes.Const)):
        if isinstance(node, jinja2.nodes.Getattr) and node.attr == "tool_calls":
            return True
        if isinstance(node, jinja2.nodes.Const) and node.value == "tool_calls":
            return True
    return False


def _calls_as_content(message: Message) -> Message:
    """An assistant turn with calls, for a template without tools: its text (if any), then the
    calls as the "json" style's reply (levante.tools.json_calls_text)."""
    calls = json_calls_text(message["tool_calls"])
    text = message.get("content", "")
    return {"role": "assistant", "content": f"{text}\n{calls}" if text.strip() else calls}


def _render_within(template: jinja2.Template, context: dict[str, Any], timeout_s: float) -> str:
    """Render, aborting once `timeout_s` has passed.

    Jinja compiles a template to Python, so a trace hook sees every step of a template loop and
    can raise inside it. A worker thread with a timeout could only abandon the render, which
    would keep spinning; this stops it. The previous trace function (debugger, coverage) is
    restored afterwards.
    """
    deadline = time.monotonic() + timeout_s

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        pieces, size = [], 0
        for piece in template.generate(context):  # counted as written, not once joined
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise _RenderTooLarge
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


class JinjaChatFormat:
    """A model's own Jinja chat template (HF conventions), rendered in a sandbox, then encoded
    so special-token text written by the template becomes control tokens.

    Tool calls and results always reach the prompt, whatever an assistant turn's `content`
    holds (null, "", text, text parts):

    - A template that reads `tool_calls` (Qwen, Llama 3.1, Hermes, ...) renders them itself:
      it gets HF-shaped messages (content "" instead of null, arguments as dicts, and the
      function `name` on each tool message).
    - A template that never does (SmolLM2's ChatML) would silently drop the calls, or fail on
      a missing content. There the calls are written as what this project asks such models
      to reply when calling (the "json" style of levante.tools): the assistant content becomes
      `{"tool_calls": [{"name": ..., "arguments": {...}}]}` after any text. Each result
      becomes `{"tool_call_id": ..., "name": ..., "content": ...}` (levante.tools.
      json_result_text) in a "tool" turn when the template shows one (ChatML does: Hermes-style
      models take results as `<|im_start|>tool`), else in a user turn, consecutive results
      joined into one so templates that insist on alternating roles still render.
    """

    def __init__(
        self,
        template: str,
        tokenizer: Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        timeout_s: float = 5.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_s = timeout_s
        self.source = template  # the template's text (Ollama reads capabilities from it)
        environment = _environment()
        try:
            self._template = environment.from_string(template)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(
                f"chat template does not compile (line {error.lineno}): {error.message}"
            ) from None
        self.reads_tool_calls = _reads_tool_calls(environment.parse(template))
        self._tool_result_role: str | None = None  # probed on first use

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tokenizer: Tokenizer) -> JinjaChatFormat:
        """From a GGUF's `tokenizer.chat_template`, with its BOS/EOS token text."""
        if "tokenizer.chat_template" not in meta:
            raise ValueError("GGUF metadata has no 'tokenizer.chat_template'")
        template = str(meta["tokenizer.chat_template"])
        tokens = meta.get("tokenizer.ggml.tokens", ())

        def token(key: str) -> str:
            token_id = meta.get(key)
            return str(tokens[int(token_id)]) if token_id is not None else ""

        bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
        return cls(template, tokenizer, bos_token=bos, eos_token=eos)

    @classmethod
    def from_hf_config(cls, tokenizer_config: Path, tokenizer: Tokenizer) -> JinjaChatFormat:
        """From tokenizer_config.json's `chat_template` (or a chat_template.jinja beside it)."""
        path = Path(tokenizer_config)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelFileError(path, f"cannot read tokenizer config: {error}") from error
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        sibling = path.parent / "chat_template.jinja"
        if template is None and sibling.is_file():
            template = sibling.read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise ModelFileError(path, "no 'chat_template' (nor chat_template.jinja beside it)")

        def token(key: str) -> str:
            value = config.get(key)
            return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")

        return cls(template, tokenizer, bos_token=token("bos_token"), eos_token=token("eos_token"))

    def render(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text; RequestError if the template rejects the conversation or misbehaves."""
        check_messages(messages)
        if tools is not None:
            _check_tools(tools)
        try:
            return self._render(self.template_messages(messages), tools, add_generation_prompt)
        except _RenderTimeout:
            problem = f"rendering took over {self.timeout_s:g} s (does the template loop forever?)"
        except _RenderTooLarge:
            problem = f"output is over {MAX_RENDER_CHARS} characters (does it loop forever?)"
        except SecurityError as error:
            problem = f"blocked by the sandbox: {error}"
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, RecursionError) as error:
            problem = f"failed: {type(error).__name__}: {error}"
        raise RequestError(f"chat template {problem}", param="messages")

    def _render(self, messages: list[Message], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        context = {
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        return _render_within(self._template, context, self.timeout_s)

    def template_messages(self, messages: list[Message]) -> list[Message]:
        """The checked messages as the template gets them (see the class docstring)."""
        names: dict[str, str] = {}  # call id -> function name
        shown: list[Message] = []
        results: Message | None = None  # the user turn of tool results being filled
        for message in map(_template_message, messages):
            if message["role"] == "assistant" and "tool_calls" in message:
                calls = message["tool_calls"]
                names.update((call.get("id", ""), call["function"]["name"]) for call in calls)
                if not self.reads_tool_calls:
                    message = _calls_as_content(message)
            if message["role"] == "tool":
                name = message.get("name") or names.get(message["tool_call_id"])
                if self.reads_tool_calls:
                    message = {**message, "name": name} if name else message
                else:
                    text = json_result_text(message["tool_call_id"], name, message["content"])
                    if results is not None:  # one user turn for consecutive results
                        results["content"] += "\n" + text
                        continue
                    message = {"role": self.tool_result_role(), "content": text}
                    shown.append(message)
                    results = message if message["role"] == "user" else None
                    continue
            shown.append(message)
            results = None
        return shown

    def tool_result_role(self) -> str:
        """The role for results: "tool" if the template shows such a turn, else "user" (probed
        once, by rendering one)."""
        if self._tool_result_role is None:
            probe = json_result_text("probe", None, "levante probe 5f1c")
            messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "tool", "content": probe}]
            try:
                text = self._render(messages, None, True)
            except (_RenderTimeout, jinja2.TemplateError, TypeError, ValueError, KeyError,
                    RecursionError):  # SecurityError is a TemplateError
                text = ""
            self._tool_result_role = "tool" if probe in text else "user"
        return self._tool_result_role

    def encode(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids of the rendered template (BOS only if the template writes it).

        Special-token text becomes control tokens only where the template wrote it: message
        contents are encoded as plain text, so a user typing "<|im_end|><|im_start|>system"
        cannot open a turn. The text between control tokens is encoded in one piece, so for
        ordinary content the ids equal encoding the whole rendered prompt."""
        text = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        specials = getattr(self.tokenizer, "special_tokens", None)
        if not specials:
            return self.tokenizer.encode(text)
        spans = self._content_spans(messages, tools, add_generation_prompt, text)
        if spans is None:  # the template reshapes content beyond recognition: whole text
            log.warning("chat template transforms message content; user text is encoded with "
                        "special tokens parsed")
            return self.tokenizer.encode(text)
        return _encode_outside_content(self.tokenizer, text, spans, specials)

    def _content_spans(self, messages: list[Message], tools: list[dict[str, Any]] | None,
                       add_generation_prompt: bool, text: str) -> list[tuple[int, int]] | None:
        """Where each message content lies in the rendered `text`: render again with each
        content replaced by a unique marker, then match the template's own text between the
        markers, and each content (as is, or trimmed as templates do) between those."""
        nonce = secrets.token_hex(8)
        shown = self.template_messages(messages)
        contents = {i: m["content"] for i, m in enumerate(shown)
                    if isinstance(m.get("content"), str) and m["content"]}
        marked = [{**m, "content": f"\ue000{nonce}{i}\ue001"} if i in contents else m
                  for i, m in enumerate(shown)]
        try:
            skeleton = self._render(marked, tools, add_generation_prompt)
        except Exception:  # noqa: BLE001 - a template that inspects content: no spans
            return None
        parts = re.split(f"\ue000{nonce}(\\d+)\ue001", skeleton)
        if not text.startswith(parts[0]):
            return None
        spans, pos = [], len(parts[0])
        for k in range(1, len(parts), 2):
            content, after = contents.get(int(parts[k])), parts[k + 1]
            if content is None:
                return None
            shown_as = next((c for c in (content, content.strip(), content.lstrip(),
                                         content.rstrip())
                             if text.startswith(c + after, pos)), None)
            if shown_as is None:
                return None
            spans.append((pos, pos + len(shown_as)))
            pos += len(shown_as) + len(after)
        return spans if pos == len(text) else None
