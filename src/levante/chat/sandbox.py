"""The Jinja sandbox chat templates render in: bounded in time and size, no unsafe access."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class RenderTimeout(Exception):
    """A template render ran past its time budget."""


class RenderTooLarge(Exception):
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

    tags = {"generation"}  # noqa: RUF012 (jinja2.ext.Extension declares it a set, per instance)

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


def environment() -> _ChatSandbox:
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


def render_within(template: jinja2.Template, context: dict[str, Any], timeout_s: float) -> str:
    """Render, aborting once `timeout_s` has passed.

    Jinja compiles a template to Python, so a trace hook sees every step of a template loop and
    can raise inside it. A worker thread with a timeout could only abandon the render, which
    would keep spinning; this stops it. The previous trace function (debugger, coverage) is
    restored afterwards.
    """
    deadline = time.monotonic() + timeout_s

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise RenderTimeout
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        pieces, size = [], 0
        for piece in template.generate(context):  # counted as written, not once joined
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise RenderTooLarge
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)
