"""Ollama Modelfiles: the text older clients send to /api/create, read into from/system/parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from levante.errors import RequestError

MAX_MODELFILE_CHARS = 1 << 20
TRIPLE = '"""'
# PARAMETER names that may repeat, each line adding a value (Ollama's list-valued options).
LIST_PARAMETERS = frozenset({"stop"})


@dataclass
class Modelfile:
    """What a Modelfile says, in /api/create's JSON terms (`parameters` values as written)."""

    from_: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    license: list[str] = field(default_factory=list)


def _refuse(line_no: int, message: str) -> RequestError:
    return RequestError(f"modelfile line {line_no}: {message}", param="modelfile")


def unquote(value: str, line_no: int) -> str:
    """A value as Ollama reads it: `\"\"\"multi-line\"\"\"`, `"quoted"` or bare (stripped)."""
    value = value.strip()
    if value.startswith(TRIPLE):
        if len(value) < 6 or not value.endswith(TRIPLE):
            raise _refuse(line_no, 'a """ value must end with """')
        return value[3:-3]
    if value.startswith('"'):
        if len(value) < 2 or not value.endswith('"'):
            raise _refuse(line_no, 'a quoted value must end with "')
        return value[1:-1]
    return value


def _instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, raw arguments) per instruction; a \"\"\" value spans lines.

    Example: 'SYSTEM \"\"\"a\\nb\"\"\"\\n# note\\nFROM x' -> [(1, "SYSTEM", '\"\"\"a\\nb\"\"\"'),
    (4, "FROM", "x")].
    """
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        line_no, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        args = args.strip()
        while args.count(TRIPLE) == 1:  # an opened """ value: join lines until it closes
            if i == len(lines):
                raise _refuse(line_no, 'a """ value is not closed')
            args += "\n" + lines[i]
            i += 1
        found.append((line_no, instruction.upper(), args))
    return found


def parse_modelfile(text: str) -> Modelfile:
    """Read FROM, SYSTEM, PARAMETER and LICENSE (comments skipped); TEMPLATE, ADAPTER, MESSAGE
    and unknown instructions are a RequestError naming the line."""
    if len(text) > MAX_MODELFILE_CHARS:
        raise RequestError(f"modelfile: longer than {MAX_MODELFILE_CHARS} characters",
                           param="modelfile")
    parsed = Modelfile()
    for line_no, instruction, args in _instructions(text):
        if instruction == "FROM":
            parsed.from_ = unquote(args, line_no)
        elif instruction == "SYSTEM":
            parsed.system = unquote(args, line_no)
        elif instruction == "LICENSE":
            parsed.license.append(unquote(args, line_no))
        elif instruction == "PARAMETER":
            name, _, value = args.partition(" ")
            if not name or not value.strip():
                raise _refuse(line_no, "PARAMETER takes a name and a value")
            _add_parameter(parsed.parameters, name, unquote(value, line_no))
        elif instruction == "TEMPLATE":
            raise _refuse(line_no, "TEMPLATE is not supported: the model's own chat template "
                                   "is used")
        elif instruction in ("ADAPTER", "MESSAGE", "REQUIRES"):
            raise _refuse(line_no, f"{instruction} is not supported: this server makes names "
                                   "for the model it serves (FROM, SYSTEM, PARAMETER)")
        else:
            raise _refuse(line_no, f"unknown instruction {instruction[:40]!r}")
    if parsed.from_ is None:
        raise RequestError("modelfile: FROM is required (the model this server serves)",
                           param="modelfile")
    return parsed


def _add_parameter(parameters: dict[str, Any], name: str, value: str) -> None:
    if name in LIST_PARAMETERS:
        parameters.setdefault(name, []).append(value)
    else:
        parameters[name] = value  # a repeated name: the last line wins, as Ollama

