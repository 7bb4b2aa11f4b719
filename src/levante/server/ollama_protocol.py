"""Ollama request bodies (pydantic, the HTTP boundary), options as SamplingParams, model names."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from levante.engine.sampling_params import SamplingParams
from levante.errors import ContextLengthError, RequestError
from levante.weights.registry import ALIASES

log = logging.getLogger(__name__)

# Ollama's documented sampling defaults, used where a request leaves an option out, so Ollama
# clients get the answers they expect. Not `repeat_penalty 1.1`: Ollama applies it to the last
# 64 tokens only, ours looks at the whole context, so the same number would bite harder here.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
# SamplingParams field -> the Ollama option it came from, for error messages.
_OPTION_NAMES = {"repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}


class Options(BaseModel):
    """`options` of /api/chat and /api/generate; an unknown name is refused (a typo would
    otherwise change nothing, silently)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Sampling methods we do not implement: accepted only at their neutral value.
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    # Loading and hardware knobs of llama.cpp with no meaning here: accepted and ignored.
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    penalize_newline: bool | None = None

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "typical_p", "tfs_z")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def check_supported(self) -> None:
        """Refuse sampling methods we would otherwise ignore, naming the option."""
        if self.mirostat not in (None, 0):
            raise RequestError("options.mirostat: mirostat sampling is not supported; use "
                               "temperature, top_k, top_p or min_p", param="options.mirostat")
        for name in ("typical_p", "tfs_z"):
            if getattr(self, name) not in (None, 1.0):
                raise RequestError(f"options.{name}: only 1.0 (off) is supported",
                                   param=f"options.{name}")
        if self.repeat_last_n not in (None, -1, 0):
            raise RequestError(
                "options.repeat_last_n: penalties here look at the whole context; send -1 "
                "(whole context) or 0 (off), or leave it out", param="options.repeat_last_n")

    def sampling_params(self, *, num_prompt_tokens: int, context: int,
                        logprobs: int | None) -> SamplingParams:
        """The engine's parameters for a prompt of `num_prompt_tokens` in a `context` window.

        `num_ctx` above the server's context is clamped to it (as Ollama clamps it to the
        model's trained context); a prompt that does not fit is refused, never truncated.
        Output stops where the window is full (`done_reason` "length"), like `num_predict`.
        """
        window = min(self.num_ctx or context, context)
        if num_prompt_tokens >= window:
            source = "options.num_ctx" if window < context else "the server's context"
            raise ContextLengthError(f"the prompt has {num_prompt_tokens} tokens; {source} is "
                                     f"{window}", param="options.num_ctx")
        if self.num_predict is not None and (self.num_predict == 0 or self.num_predict < -2):
            raise RequestError("options.num_predict must be a positive number of tokens, -1 "
                               "(no limit) or -2 (fill the context)", param="options.num_predict")
        room = window - num_prompt_tokens
        num_predict = self.num_predict or 0
        max_tokens = min(num_predict, room) if num_predict > 0 else room
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **self._sampling())
        except RequestError as e:
            name = _OPTION_NAMES.get(e.param or "", e.param or "")
            message = str(e).replace(e.param or "", name, 1)
            raise RequestError(f"options.{message}", param=f"options.{name}") from None

    def _sampling(self) -> dict[str, Any]:
        """llama.cpp's conventions: temperature <= 0 is greedy, top_k <= 0 and top_p >= 1 are
        off, a negative seed is random, repeat_last_n 0 turns the repeat penalty off."""
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        top_k = DEFAULT_TOP_K if self.top_k is None else self.top_k
        top_p = DEFAULT_TOP_P if self.top_p is None else min(self.top_p, 1.0)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        is_repeat_off = self.repeat_last_n == 0 or self.repeat_penalty is None
        repeat = 1.0 if is_repeat_off else self.repeat_penalty
        return {"temperature": max(temperature, 0.0), "top_k": top_k if top_k > 0 else None,
                "top_p": top_p, "min_p": self.min_p or 0.0, "repetition_penalty": repeat,
                "presence_penalty": self.presence_penalty or 0.0,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "seed": None if self.seed is None or self.seed < 0 else self.seed, "stop": stop}


class _Generating(BaseModel):
    """Fields /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None  # the model stays loaded while the server runs
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def check_supported(self) -> None:
        """Refuse what we cannot honour yet (structured output, thinking); log unknown fields."""
        for name in self.model_extra or {}:
            log.info("ignoring unknown Ollama request field %r", name)
        if self.think not in (None, False):
            raise RequestError(f'"{self.model}" does not support thinking', param="think")
        (self.options or Options()).check_supported()

    def response_format(self) -> dict[str, Any] | None:
        """Ollama's `format` as an OpenAI response_format: "json" or a JSON schema."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return {"type": "json_object"}
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"name": "format",
                                                           "schema": self.format}}
        raise RequestError(f'format must be "json" or a JSON schema, got {self.format!r}',
                           param="format")

    def num_logprobs(self) -> int | None:
        """None (no logprobs) or how many alternatives to list with each token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatBody(_Generating):
    """POST /api/chat."""

    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages in OpenAI's shape. Ollama's calls carry no ids: each gets one, and tool
        results are matched to the earlier calls in order. Images are refused."""
        messages: list[dict[str, Any]] = []
        pending: list[str] = []  # ids of calls not yet answered, oldest first
        for index, message in enumerate(self.messages):
            if not isinstance(message, dict):
                raise RequestError(f"messages[{index}] must be an object", param="messages")
            if message.get("images"):
                raise RequestError(f"messages[{index}].images: images are not supported",
                                   param="messages")
            # "thinking" (a thinking model's earlier reasoning) is not part of the prompt.
            entry: dict[str, Any] = {"role": message.get("role"),
                                     "content": message.get("content")}
            if message.get("tool_calls"):
                entry["tool_calls"] = _openai_calls(index, message["tool_calls"], pending)
            if message.get("role") == "tool":
                if not pending:
                    raise RequestError(f"messages[{index}]: a tool result with no call before "
                                       "it", param="messages")
                entry["tool_call_id"] = pending.pop(0)
            messages.append(entry)
        return messages


def _openai_calls(index: int, calls: Any, pending: list[str]) -> list[dict[str, Any]]:
    """Ollama's [{"function": {"name", "arguments": {...}}}] as OpenAI calls with fresh ids."""
    if not isinstance(calls, list):
        raise RequestError(f"messages[{index}].tool_calls must be a list", param="messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"messages[{index}].tool_calls: each needs function.name",
                               param="messages")
        call_id = f"call{index}x{len(pending)}"
        pending.append(call_id)
        arguments = function.get("arguments") or {}
        out.append({"id": call_id, "type": "function", "function": {
            "name": function["name"], "arguments": arguments if isinstance(arguments, str)
            else json.dumps(arguments)}})
    return out


class GenerateBody(_Generating):
    """POST /api/generate."""

    prompt: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None

    def check_supported(self) -> None:
        """As for chat, and refuse the fields that would change the prompt in ways we don't."""
        super().check_supported()
        if self.template:
            raise RequestError("template is not supported: the model's own chat template is "
                               "used; send raw: true with a formatted prompt instead",
                               param="template")
        if self.suffix:  # a fill-in-the-middle prompt (chat.fim) replaces the template's
            for name in ("raw", "system", "context"):
                if getattr(self, name):
                    raise RequestError(f"{name} is not supported with suffix: the prompt is "
                                       f"the model's fill-in-the-middle format", param=name)
        if self.images:
            raise RequestError("images are not supported: this model reads text only",
                               param="images")
        if self.raw and self.system:
            raise RequestError("system has no effect with raw: true; put it in the prompt",
                               param="system")


class NamedBody(BaseModel):
    """POST /api/show, /api/pull and /api/delete (and /api/create's name): `model`, or `name`
    as older clients send it."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    name: str | None = None
    stream: bool = True

    @property
    def ref(self) -> str:
        ref = self.model or self.name
        if not ref:
            raise RequestError("model is required", param="model")
        return ref


class EmbedBody(BaseModel):
    """POST /api/embed: one text or a list; over-long inputs are cut to the context unless
    `truncate` is false; `dimensions` keeps the first n values (renormalized), as Ollama."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    options: Options | None = None
    keep_alive: float | str | None = None

    def texts(self) -> list[str]:
        """The inputs; an empty string or list embeds nothing (Ollama's "embeddings": [])."""
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return list(self.input or [])


class EmbeddingsBody(BaseModel):
    """POST /api/embeddings (Ollama's older route): one `prompt`, not normalized."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = ""
    options: Options | None = None
    keep_alive: float | str | None = None


class CopyBody(BaseModel):
    """POST /api/copy."""

    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


# /api/create fields that need files uploaded first (/api/blobs) or a model built from them.
_UPLOAD_FIELDS = ("files", "adapters", "path", "quantize", "remote_host")


class CreateBody(NamedBody):
    """POST /api/create: another name (`model`, or `name` from older clients) for a model
    this server has (`from`), with its own system prompt and default parameters, given as
    fields or as a Modelfile's text (as older clients send). What needs uploads or a new
    model is refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    from_: str | None = Field(default=None, alias="from")
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Any] | None = None
    license: str | list[str] | None = None  # kept by Ollama for `show`; nothing to enforce
    modelfile: str | None = None

    def with_modelfile(self) -> CreateBody:
        """The body with its Modelfile's FROM, SYSTEM and PARAMETERs filled in (fields given
        in the body win); itself when it has none."""
        if not self.modelfile:
            return self
        from levante.server.ollama_modelfile import parse_modelfile

        parsed = parse_modelfile(self.modelfile)
        return self.model_copy(update={
            "from_": self.from_ or parsed.from_, "system": self.system or parsed.system,
            "parameters": {**parsed.parameters, **(self.parameters or {})}, "modelfile": None})

    def check_supported(self) -> Options:
        """Refuse what this server cannot build; the parameters, checked, as options."""
        for name in _UPLOAD_FIELDS:
            if (self.model_extra or {}).get(name):
                raise RequestError(
                    f"{name}: creating a model from uploaded files is not supported here; "
                    "send from (a model this server has) with system and parameters to make "
                    "an alias of it", param=name)
        if not self.from_:
            raise RequestError("from is required: the name of a model this server has",
                               param="from")
        if self.template:
            raise RequestError("template is not supported: the model's own chat template is "
                               "used", param="template")
        if self.messages:
            raise RequestError("messages are not supported", param="messages")
        try:
            options = Options.model_validate(self.parameters or {})
        except ValidationError as e:
            first = e.errors()[0]
            name = ".".join(str(p) for p in first.get("loc", ()))
            raise RequestError(f"parameters.{name}: {first.get('msg')}",
                               param=f"parameters.{name}") from None
        options.check_supported()
        return options


def served_name(requested: str, served: tuple[str, ...]) -> str | None:
    """The served name `requested` means, as Ollama clients write it, or None.

    Example: served ("smollm2",): "smollm2", "smollm2:latest" and "smollm2:135m" (an alias
    in `levante.weights.registry`) all give "smollm2"; "llama3.2" gives None.
    """
    bare = requested.removesuffix(":latest")
    for name in (requested, bare, ALIASES.get(requested.lower()), ALIASES.get(bare.lower())):
        if name in served:
            return name
    return None


def tagged(name: str) -> str:
    """A name as Ollama lists it, with a tag: "smollm2" -> "smollm2:latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
