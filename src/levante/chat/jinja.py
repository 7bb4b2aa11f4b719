"""A model's own Jinja chat template (GGUF or HF), rendered in the sandbox, then encoded."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError

from levante.chat.messages import Message, check_messages, check_tools
from levante.chat.sandbox import (
    MAX_RENDER_CHARS,
    RenderTimeout,
    RenderTooLarge,
    environment,
    render_within,
)
from levante.chat.tools import json_calls_text, json_result_text
from levante.errors import ModelFileError, RequestError
from levante.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
    calls as the "json" style's reply (levante.chat.tools.json_calls_text)."""
    calls = json_calls_text(message["tool_calls"])
    text = message.get("content", "")
    return {"role": "assistant", "content": f"{text}\n{calls}" if text.strip() else calls}


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
      to reply when calling (the "json" style of levante.chat.tools): the assistant content becomes
      `{"tool_calls": [{"name": ..., "arguments": {...}}]}` after any text. Each result
      becomes `{"tool_call_id": ..., "name": ..., "content": ...}` (levante.chat.tools.
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
        env = environment()
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(
                f"chat template does not compile (line {error.lineno}): {error.message}"
            ) from None
        self.reads_tool_calls = _reads_tool_calls(env.parse(template))
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
            check_tools(tools)
        try:
            return self._render(self.template_messages(messages), tools, add_generation_prompt)
        except RenderTimeout:
            problem = f"rendering took over {self.timeout_s:g} s (does the template loop forever?)"
        except RenderTooLarge:
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
        return render_within(self._template, context, self.timeout_s)

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
            except (RenderTimeout, jinja2.TemplateError, TypeError, ValueError, KeyError,
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
