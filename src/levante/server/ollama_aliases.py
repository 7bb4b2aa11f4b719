"""Ollama model names: the served model's, and those /api/create and /api/copy make (in memory)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from levante.errors import RequestError
from levante.server.http import HTTPError
from levante.server.ollama_protocol import (
    ChatBody,
    CopyBody,
    CreateBody,
    GenerateBody,
    Options,
    served_name,
    tagged,
)

if TYPE_CHECKING:
    from levante.server.routes import ServerState

# Ollama's names: [host/][namespace/]model[:tag], letters, digits, '.', '_', '-'.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,2}"
                  r"(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")
MAX_NAME_CHARS = 350


@dataclass(frozen=True)
class Alias:
    """One Ollama model name on this server: the served model, or a name made for it with its
    own system prompt and default options (Ollama option names -> values)."""

    name: str  # as /api/tags lists it: "helper:latest"
    system: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    modified_at: str | None = None  # None: the served file's own time
    is_served: bool = False

    def options_for(self, given: Options | None) -> Options:
        """The request's options over this name's defaults."""
        overrides = given.model_dump(exclude_none=True) if given else {}
        return Options.model_validate({**self.options, **overrides})

    def apply(self, body: ChatBody | GenerateBody) -> ChatBody | GenerateBody:
        """The request as this name means it: its default options, and its system prompt
        where the request brings none (a chat whose first message is not "system", as
        Ollama; a generate without `system`, unless raw). An empty request stays empty (it
        answers "load")."""
        update: dict[str, Any] = {"options": self.options_for(body.options)}
        system = self.system
        if system and isinstance(body, ChatBody) and body.messages and not (
                _starts_with_system(body.messages)):
            update["messages"] = [{"role": "system", "content": system}, *body.messages]
        elif system and isinstance(body, GenerateBody) and not (body.system or body.raw):
            update["system"] = system
        return body.model_copy(update=update)


def _starts_with_system(messages: list[Any]) -> bool:
    return isinstance(messages[0], dict) and messages[0].get("role") == "system"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def lookup(state: ServerState, requested: str) -> Alias:
    """The Alias a request's model name means; 404 (Ollama's shape) for an unknown name."""
    if served_name(requested, state.model_names) is not None:
        return Alias(tagged(state.model_names[0]), is_served=True)
    alias = state.aliases.get(tagged(requested))
    if alias is None:
        names = [tagged(state.model_names[0]), *state.aliases]
        raise HTTPError(404, f'model "{requested}" not found: this server has '
                        f'{", ".join(names)} (`levante serve REF` serves another)',
                        type_="invalid_request_error", param="model", code="model_not_found")
    return alias


def _new_name(state: ServerState, name: str, param: str) -> str:
    """A name a new alias may take: well-formed, and not one of the served model's."""
    if len(name) > MAX_NAME_CHARS or not NAME.fullmatch(name):
        raise RequestError(f'{param}: name "{name[:100]}" is invalid', param=param)
    if served_name(name, state.model_names) is not None:
        raise RequestError(f'{param}: "{name}" names the model this server runs',
                           param=param)
    return tagged(name)


def looks_like_path(ref: str) -> bool:
    """Whether a `from` names a file rather than a model: "./m.gguf", "/models/x", "~/x"."""
    return ref.lower().endswith(".gguf") or ref.startswith(("/", "./", "../", "~", "\\"))


def _base(state: ServerState, ref: str) -> Alias:
    """The Alias `from` means: a model name, or the path of the file this server serves.
    Any other path gets one answer, whether or not it exists (no file oracle)."""
    if not looks_like_path(ref):
        return lookup(state, ref)
    served = os.path.realpath(state.bundle.path)
    if os.path.realpath(os.path.expanduser(ref)) == served:
        return Alias(tagged(state.model_names[0]), is_served=True)
    raise RequestError(f"from: this server serves one model, {state.model_names[0]!r}, and "
                       "makes names only for it; a path must name the file it serves",
                       param="from")


def create(state: ServerState, body: CreateBody) -> Alias:
    """/api/create: a name for `from` (the served model, its file, or an alias), its system
    prompt and parameters over those of `from`; from fields or a Modelfile."""
    name = _new_name(state, body.ref, "model")
    body = body.with_modelfile()
    options = body.check_supported()
    base = _base(state, body.from_ or "")
    system = body.system or base.system
    if system and state.bundle.chat_format is None:
        raise RequestError("system: this model has no chat template to put it in",
                           param="system")
    merged = {**base.options, **options.model_dump(exclude_none=True)}
    alias = Alias(name, system, merged, _now())
    state.aliases[name] = alias
    return alias


def copy(state: ServerState, body: CopyBody) -> None:
    """/api/copy: `destination` becomes another name for what `source` names."""
    source = lookup(state, body.source)
    name = _new_name(state, body.destination, "destination")
    state.aliases[name] = replace(source, name=name, modified_at=_now(), is_served=False)


def delete(state: ServerState, requested: str) -> None:
    """/api/delete: forget a name made here. The served model's names are refused: this
    server cannot go on without its model, and model files are not removed over HTTP."""
    if served_name(requested, state.model_names) is not None:
        raise RequestError(f'"{requested}" is the model this server runs; it cannot be '
                           "deleted while served (stop the server; model files are removed "
                           "from the models folder, not over this API)", param="model")
    if state.aliases.pop(tagged(requested), None) is None:
        raise HTTPError(404, f"model '{requested}' not found", type_="invalid_request_error",
                        param="model", code="model_not_found")
