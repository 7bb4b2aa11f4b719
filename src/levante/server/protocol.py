"""OpenAI request bodies (pydantic, the HTTP boundary) and their mapping to SamplingParams."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError

log = logging.getLogger(__name__)

# Fields that would constrain the output in other servers; accepting them silently would give
# an unconstrained answer the client believes is constrained.
UNSUPPORTED_CONSTRAINTS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                           "guided_decoding_backend", "guided_whitespace_pattern",
                           "structured_outputs", "grammar", "json_schema")
MAX_N = 16
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk


class _Common(BaseModel):
    """Parameters shared by chat and text completions (OpenAI names, plus vLLM's extras).

    Strict types, as OpenAI's API: "max_tokens": "10", true or 10.0 and "stream": "yes" are
    400s, not quietly coerced (an int is still a valid float)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras that clients (and `levante bench`) send.
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                     "repetition_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def check_extras(self) -> None:
        """Log unknown fields; refuse those that would constrain output we don't constrain."""
        for name in self.model_extra or {}:
            if name in UNSUPPORTED_CONSTRAINTS:
                raise RequestError(f"'{name}' is not supported; use response_format",
                                   param=name, code="unsupported_parameter")
            log.info("ignoring unknown request field %r", name)

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters; raises RequestError naming the field."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = tuple((_token_id(k), v) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k, min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            logprobs=logprobs, logit_bias=bias,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)


def _token_id(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise RequestError(f"logit_bias keys must be token ids, got {key!r}",
                           param="logit_bias") from None


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens=self.max_completion_tokens or self.max_tokens,
                                    logprobs=logprobs)


class CompletionRequest(_Common):
    """POST /v1/completions (prompt as text, token ids, or a list of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def params(self) -> SamplingParams:
        """With `echo`, the prompt is scored too (its tokens' logprobs when `logprobs` is set,
        OpenAI's legacy API, which lm-eval's loglikelihood uses with max_tokens 0). A `suffix`
        makes a fill-in-the-middle prompt of each text prompt (chat.fim); with `echo` it is a
        400: the echoed prompt would be the FIM prompt, control tokens and suffix first."""
        if self.suffix and self.echo:
            raise RequestError("echo is not supported with suffix (fill-in-the-middle)",
                               param="echo")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens 0 returns nothing without echo", param="max_tokens")
        scored = (self.logprobs or 0) if self.echo else None
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs,
                                    prompt_logprobs=scored)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a text prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True  # text: BOS where the model adds one
    add_generation_prompt: bool = True  # chat: end with the assistant's turn opening


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: text, token ids, or a list of either."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The input as a list of inputs (text or token ids), none of them empty."""
        given = self.input
        if isinstance(given, str):
            items: list[str | list[int]] = [given]
        elif given and all(isinstance(x, int) for x in given):
            items = [list(given)]  # type: ignore[arg-type]
        else:
            items = list(given)  # type: ignore[arg-type]
        if not items:
            raise RequestError("input must not be empty", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise RequestError(f"input has {len(items)} items; at most "
                               f"{MAX_EMBEDDING_INPUTS} per request", param="input")
        if any(len(item) == 0 for item in items):
            raise RequestError("input holds an empty string or token list", param="input")
        return items


def error_body(message: str, *, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

